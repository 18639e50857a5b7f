"""The one stage runner: every stage (record, reduce, tune, evaluate) says what its units are and
how a worker computes one; skipping, invalidation, progress, retries, failure rows and the
completion markers live here.

A unit is done when its output's marker holds the unit's fingerprint (`store.is_done`). The
worker computes a unit, writes its output atomically and marks it done itself; the driver gets
a small receipt back, never the data. Two executors launch units: an actor pool with
checkpoint affinity (record, evaluate, tune: an actor keeps one checkpoint loaded) that follows
the live cluster, and a task pool for stateless units (reduce).
"""

from __future__ import annotations

import pickle
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm.auto import tqdm

from moegrok.store import changed_inputs, error_fields, failure_row, fingerprint, invalidate, is_done, mark_done


@dataclass
class Unit:
    name: str  # names the unit in progress bars and failures.parquet, e.g. "step300/shard00002"
    checkpoint: str  # units of one checkpoint go to the actor that has it loaded
    output: Path  # the file or dir whose completion marker says the unit is done
    inputs: dict[str, Any]  # everything that determines the output, by name (config keys where they are)
    payload: Any = None  # what the worker needs beyond its constructor arguments (small)
    attempt: int = 0
    lost_actors: int = 0  # times its actor died under it (node loss, OOM kill)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs)


@dataclass
class StageResult:
    stage: str
    units: int = 0
    skipped: int = 0
    done: int = 0
    failures: list[dict] = field(default_factory=list)
    receipts: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    bytes_received: int = 0  # what the workers sent the driver (pickled receipts): no data, only receipts

    @property
    def failed(self) -> int:
        return len(self.failures)

    def summary(self) -> dict:
        return {"stage": self.stage, "units": self.units, "skipped": self.skipped, "done": self.done,
                "failed": self.failed, "seconds": round(self.seconds, 1)}


Receipt = dict  # {"ok": True, "seconds": ..., **worker fields} | {"ok": False, "error_type", "message"}
Executor = Callable[[list[Unit]], Iterator[tuple[Unit, Receipt]]]


def run_unit(compute: Callable[[Unit], dict | None], unit: Unit) -> Receipt:
    """Compute one unit (the callable writes its output atomically), then mark it done. Errors
    become a failure receipt: a bad unit never takes its worker down."""
    start = time.perf_counter()
    try:
        receipt = compute(unit) or {}
    except Exception as e:
        return {"ok": False, **error_fields(e)}
    mark_done(unit.output, unit.inputs)
    return {"ok": True, "seconds": time.perf_counter() - start, **receipt}


class UnitWorker:
    """Base of the stage actors: `run` is what the pool calls, `compute` what a stage defines."""

    def compute(self, unit: Unit) -> dict | None:
        raise NotImplementedError

    def run(self, unit: Unit) -> Receipt:
        return run_unit(self.compute, unit)


def run_stage(stage: str, units: list[Unit], make_executor: Callable[[list[Unit]], Executor], *,
              progress: bool = True) -> StageResult:
    """Skip the units whose output is current; say why the others run (new, or which inputs
    changed); invalidate them and run them on `make_executor(todo)`, which is only called (and
    Ray only needed) when there is something to do."""
    start = time.perf_counter()
    todo = [unit for unit in units if not is_done(unit.output, unit.fingerprint)]
    result = StageResult(stage, units=len(units), skipped=len(units) - len(todo))
    reasons = Counter(reason for unit in todo for reason in changed_inputs(unit.output, unit.inputs))
    if reasons.keys() - {"new"}:  # recomputing what was done before: say what changed
        print(f"{stage}: recomputing {len(todo)} of {len(units)} units: "
              + ", ".join(f"{name} changed ({count})" for name, count in reasons.most_common() if name != "new"))
    for unit in todo:
        invalidate(unit.output)
    with tqdm(total=len(todo), desc=stage, disable=not progress or not todo, unit="unit") as bar:
        for unit, receipt in make_executor(todo)(todo) if todo else ():
            result.bytes_received += len(pickle.dumps(receipt))
            if receipt["ok"]:
                result.done += 1
                result.receipts.append({"unit": unit.name, **receipt})
            else:
                result.failures.append(failure_row(stage, unit.name, receipt["error_type"], receipt["message"]))
            bar.update()
    result.seconds = time.perf_counter() - start
    return result


def _lost(exc: BaseException) -> Receipt:
    return {"ok": False, "error_type": type(exc).__name__, "message": str(exc)[-2000:]}


def _retry(unit: Unit, receipt: Receipt, *, max_retries: int, max_lost_actors: int) -> bool:
    if receipt.get("actor_lost"):
        unit.lost_actors += 1
        return unit.lost_actors <= max_lost_actors
    unit.attempt += 1
    return unit.attempt <= max_retries


class ActorPool:
    """Run units on up to `num_actors` actors of `worker_cls` with checkpoint affinity.

    An idle actor takes the next unit of its own checkpoint; otherwise the next checkpoint
    nobody works on (checkpoint-major order); otherwise it helps the checkpoint with most units
    left. A unit whose worker reports an error is retried up to `max_retries` times. An actor
    that dies (its node is lost, its process is killed) is replaced, and its unit goes back to
    the queue without using a retry; units go only to actors that have started, so a
    replacement that no live node can host holds nothing up. If no actor can start within
    `start_timeout_s`, the remaining units fail with a message naming the resources asked for.
    """

    def __init__(self, worker_cls: type, *args: object, options: dict, num_actors: int, max_retries: int,
                 max_lost_actors: int = 3, start_timeout_s: float = 600.0) -> None:
        self.remote = ray.remote(worker_cls).options(**options)
        self.name, self.args, self.options = worker_cls.__name__, args, options
        self.num_actors, self.max_retries = num_actors, max_retries
        self.max_lost_actors, self.start_timeout_s = max_lost_actors, start_timeout_s

    def __call__(self, units: list[Unit]) -> Iterator[tuple[Unit, Receipt]]:
        pending: OrderedDict[str, deque[Unit]] = OrderedDict()
        for unit in units:
            pending.setdefault(unit.checkpoint, deque()).append(unit)
        starting: dict[ray.ObjectRef, object] = {}  # ready probe -> actor
        idle: list = []
        current: dict[object, str | None] = {}
        in_flight: dict[ray.ObjectRef, tuple[object, Unit]] = {}

        def start_actor() -> None:
            actor = self.remote.remote(*self.args)
            current[actor] = None
            starting[actor.__ray_ready__.remote()] = actor

        def next_unit(actor) -> Unit | None:
            own = current[actor]
            if pending.get(own):
                return pending[own].popleft()
            busy = {current[a] for a, _ in in_flight.values()}
            fresh = [c for c, queue in pending.items() if queue and c not in busy]
            candidates = fresh or sorted((c for c, q in pending.items() if q), key=lambda c: -len(pending[c]))
            if not candidates:
                return None
            current[actor] = candidates[0]
            return pending[candidates[0]].popleft()

        def dispatch() -> None:
            while idle:
                unit = next_unit(idle[-1])
                if unit is None:
                    return
                actor = idle.pop()
                in_flight[actor.run.remote(unit)] = (actor, unit)

        def remaining() -> int:
            return sum(len(queue) for queue in pending.values())

        def fail_remaining(error_type: str, message: str):
            for queue in pending.values():
                while queue:
                    yield queue.popleft(), {"ok": False, "error_type": error_type, "message": message}

        for _ in range(min(self.num_actors, len(units))):
            start_actor()
        waiting_since = time.monotonic()
        failed_starts, started = 0, 0
        try:
            while in_flight or remaining():
                if not in_flight and not idle and time.monotonic() - waiting_since > self.start_timeout_s:
                    yield from fail_remaining("ActorUnschedulable", f"no actor could start within "
                                              f"{self.start_timeout_s:.0f} s: no live node has the resources one "
                                              f"asks for ({self.options})")
                    return
                finished, _ = ray.wait([*in_flight, *starting], num_returns=1, timeout=5.0)
                if not finished:
                    continue
                ready = finished[0]
                if ready in starting:
                    actor = starting.pop(ready)
                    try:
                        ray.get(ready)
                        idle.append(actor)
                        started += 1
                    except RayActorError as e:
                        failed_starts += 1
                        if not started and failed_starts > self.max_lost_actors:  # its constructor fails
                            yield from fail_remaining(type(e).__name__, f"no {self.name} actor starts: "
                                                      f"{str(e)[-1500:]}")
                            return
                        if remaining():  # a node died under it: try another
                            start_actor()
                    dispatch()
                    continue
                actor, unit = in_flight.pop(ready)
                try:
                    receipt = ray.get(ready)
                    idle.append(actor)
                except RayActorError as e:  # the process or its node died: the unit is not to blame
                    receipt = {**_lost(e), "actor_lost": True}
                    start_actor()
                except RayTaskError as e:
                    receipt = _lost(e)
                    idle.append(actor)
                if not receipt["ok"] and _retry(unit, receipt, max_retries=self.max_retries,
                                                max_lost_actors=self.max_lost_actors):
                    pending.setdefault(unit.checkpoint, deque()).appendleft(unit)
                else:
                    receipt.pop("actor_lost", None)
                    yield unit, receipt
                waiting_since = time.monotonic()
                dispatch()
        finally:
            for actor in [*current]:
                ray.kill(actor)


class TaskPool:
    """Run stateless units as Ray tasks, at most `max_in_flight` at a time. `compute(unit)` (a
    module-level function or a partial of one) writes the unit's output."""

    def __init__(self, compute: Callable[[Unit], dict | None], *, options: dict, max_in_flight: int,
                 max_retries: int) -> None:
        self.task = ray.remote(run_unit).options(**options)
        self.compute = compute
        self.max_in_flight, self.max_retries = max(1, max_in_flight), max_retries

    def __call__(self, units: list[Unit]) -> Iterator[tuple[Unit, Receipt]]:
        queue = deque(units)
        in_flight: dict[ray.ObjectRef, Unit] = {}
        while queue or in_flight:
            while queue and len(in_flight) < self.max_in_flight:
                unit = queue.popleft()
                in_flight[self.task.remote(self.compute, unit)] = unit
            (ready,), _ = ray.wait(list(in_flight), num_returns=1)
            unit = in_flight.pop(ready)
            try:
                receipt = ray.get(ready)
            except (RayActorError, RayTaskError) as e:  # Ray already retried a lost worker
                receipt = _lost(e)
            if not receipt["ok"] and _retry(unit, receipt, max_retries=self.max_retries, max_lost_actors=0):
                queue.appendleft(unit)
            else:
                yield unit, receipt

