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
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm.auto import tqdm

from moegrok.store import (
    AnyPath,
    ObjectPath,
    changed_inputs,
    configure_storage,
    error_fields,
    failure_row,
    fingerprint,
    invalidate,
    is_done,
    mark_done,
    one_line,
    read_markers,
)


@dataclass
class Unit:
    name: str  # names the unit in progress bars and failures.parquet, e.g. "step300/shard00002"
    checkpoint: str  # units of one checkpoint go to the actor that has it loaded
    output: AnyPath  # the file or dir whose completion marker says the unit is done
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
        """Units that failed (after their retries)."""
        return sum(row["kind"] == "unit" for row in self.failures)

    @property
    def bad_records(self) -> int:
        """Input records left out: a malformed sample line, a benchmark item that could not be scored."""
        return sum(row["kind"] == "record" for row in self.failures)

    def summary(self) -> dict:
        return {"stage": self.stage, "units": self.units, "skipped": self.skipped, "done": self.done,
                "failed": self.failed, "bad_records": self.bad_records, "seconds": round(self.seconds, 1)}


Receipt = dict  # {"ok": True, "seconds": ..., **worker fields} | {"ok": False, "error_type", "message"}
Executor = Callable[[list[Unit]], Iterator[tuple[Unit, Receipt]]]


def run_unit(compute: Callable[[Unit], dict | None], unit: Unit) -> Receipt:
    """Compute one unit (the callable writes its output atomically), then mark it done. Errors
    become a failure receipt: a bad unit never takes its worker down."""
    start = time.perf_counter()
    if isinstance(unit.output, ObjectPath):  # the driver's storage.options, on every worker
        configure_storage(unit.output.options)
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
    read_markers([unit.output for unit in units])  # on an object store: a LIST per directory, not a HEAD per unit
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
                result.failures.append(failure_row(stage, unit.name, receipt["error_type"], receipt["message"],
                                                   stack=receipt.get("stack", "")))
            bar.update()
    result.seconds = time.perf_counter() - start
    return result


def _remote_error(exc: BaseException) -> tuple[str, str]:
    """(error type, one-line message) of what Ray raised for a remote failure: the remote exception
    itself where Ray keeps it (a task's cause), the last line of the creation task's traceback for
    an actor whose constructor raised, else Ray's own first line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return type(cause).__name__, one_line(str(cause) or type(cause).__name__)
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if getattr(exc, "_actor_init_failed", False) and lines:
        error_type, _, message = lines[-1].strip().partition(": ")
        return error_type, one_line(message or error_type)
    return type(exc).__name__, one_line(lines[0] if lines else type(exc).__name__)


def _lost(exc: BaseException) -> Receipt:
    """The receipt of a unit whose task or actor raised outside the unit's own code."""
    error_type, message = _remote_error(exc)
    return {"ok": False, "error_type": error_type, "message": message, "stack": str(exc)[-4000:]}


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
        run = _PoolRun(self, units)
        try:
            yield from run.events()
        finally:
            run.kill_actors()


class _PoolRun:
    """One ActorPool call: the queues and actors, and a method per event (an actor started or
    failed to start, a unit finished)."""

    def __init__(self, pool: ActorPool, units: list[Unit]) -> None:
        self.pool = pool
        self.pending: OrderedDict[str, deque[Unit]] = OrderedDict()  # checkpoint -> its units, in order
        for unit in units:
            self.pending.setdefault(unit.checkpoint, deque()).append(unit)
        self.starting: dict[ray.ObjectRef, object] = {}  # ready probe -> actor
        self.idle: list = []
        self.checkpoint_of: dict[object, str | None] = {}  # every live actor -> the checkpoint it holds
        self.in_flight: dict[ray.ObjectRef, tuple[object, Unit]] = {}
        self.failed_starts, self.started = 0, 0
        for _ in range(min(pool.num_actors, len(units))):
            self.start_actor()

    def events(self) -> Iterator[tuple[Unit, Receipt]]:
        waiting_since = time.monotonic()
        while self.in_flight or self.remaining():
            if not self.in_flight and not self.idle and time.monotonic() - waiting_since > self.pool.start_timeout_s:
                yield from self.fail_remaining("ActorUnschedulable", f"no actor could start within "
                                               f"{self.pool.start_timeout_s:.0f} s: no live node has the resources "
                                               f"one asks for ({self.pool.options})")
                return
            finished, _ = ray.wait([*self.in_flight, *self.starting], num_returns=1, timeout=5.0)
            if not finished:
                continue
            if finished[0] in self.starting:
                if (error := self.on_start(finished[0])) is not None:
                    yield from self.fail_remaining(*error)
                    return
            else:
                yield from self.on_finished(finished[0])
                waiting_since = time.monotonic()
            self.dispatch()

    # ------------------------------------------------------------------ actors

    def start_actor(self) -> None:
        actor = self.pool.remote.remote(*self.pool.args)
        self.checkpoint_of[actor] = None
        self.starting[actor.__ray_ready__.remote()] = actor

    def on_start(self, probe: ray.ObjectRef) -> tuple[str, str] | None:
        """An actor started (now idle) or failed to; (error type, message) when no actor of the
        pool can start at all (its constructor fails)."""
        actor = self.starting.pop(probe)
        try:
            ray.get(probe)
        except RayActorError as e:
            del self.checkpoint_of[actor]
            self.failed_starts += 1
            if not self.started and self.failed_starts > self.pool.max_lost_actors:
                error_type, message = _remote_error(e)
                return error_type, f"no {self.pool.name} actor starts: {message}"
            if self.remaining():  # a node died under it: try another
                self.start_actor()
            return None
        self.idle.append(actor)
        self.started += 1
        return None

    def kill_actors(self) -> None:
        for actor in [*self.checkpoint_of]:
            ray.kill(actor)

    # ------------------------------------------------------------------ units

    def remaining(self) -> int:
        return sum(len(queue) for queue in self.pending.values())

    def next_unit(self, actor) -> Unit | None:
        own = self.checkpoint_of[actor]
        if self.pending.get(own):
            return self.pending[own].popleft()
        busy = {self.checkpoint_of[a] for a, _ in self.in_flight.values()}
        fresh = [c for c, queue in self.pending.items() if queue and c not in busy]
        candidates = fresh or sorted((c for c, q in self.pending.items() if q), key=lambda c: -len(self.pending[c]))
        if not candidates:
            return None
        self.checkpoint_of[actor] = candidates[0]
        return self.pending[candidates[0]].popleft()

    def dispatch(self) -> None:
        while self.idle:
            unit = self.next_unit(self.idle[-1])
            if unit is None:
                return
            actor = self.idle.pop()
            self.in_flight[actor.run.remote(unit)] = (actor, unit)

    def on_finished(self, ref: ray.ObjectRef) -> Iterator[tuple[Unit, Receipt]]:
        """A unit's receipt: yielded, or its unit queued again (a retry, or its actor died)."""
        actor, unit = self.in_flight.pop(ref)
        try:
            receipt = ray.get(ref)
            self.idle.append(actor)
        except RayActorError as e:  # the process or its node died: the unit is not to blame
            receipt = {**_lost(e), "actor_lost": True}
            del self.checkpoint_of[actor]
            self.start_actor()
        except RayTaskError as e:
            receipt = _lost(e)
            self.idle.append(actor)
        if not receipt["ok"] and _retry(unit, receipt, max_retries=self.pool.max_retries,
                                        max_lost_actors=self.pool.max_lost_actors):
            self.pending.setdefault(unit.checkpoint, deque()).appendleft(unit)
        else:
            receipt.pop("actor_lost", None)
            yield unit, receipt

    def fail_remaining(self, error_type: str, message: str) -> Iterator[tuple[Unit, Receipt]]:
        for queue in self.pending.values():
            while queue:
                yield queue.popleft(), {"ok": False, "error_type": error_type, "message": message}


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

