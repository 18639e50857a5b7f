"""Checkpoint-affine scheduling of (checkpoint x unit) work over a pool of Ray actors.

Each actor keeps one checkpoint loaded. An idle actor takes the next unit of its own
checkpoint; otherwise the next checkpoint nobody works on (checkpoint-major order); otherwise
it helps with the checkpoint that has the most units left. A failed unit is retried up to
`max_retries` times (on any actor); a dead actor is replaced.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayTaskError


@dataclass
class Unit:
    checkpoint: str
    key: Hashable  # e.g. the shard index
    payload: object  # what the actor needs (refs, ObjectRefs)
    attempt: int = 0


def run_units(
    units: list[Unit],
    *,
    make_actor: Callable[[], object],
    num_actors: int,
    submit: Callable[[object, Unit], ray.ObjectRef],
    on_done: Callable[[Unit, dict], None],
    max_retries: int,
) -> None:
    """Run every unit; `on_done(unit, result)` gets each final result (result["ok"] tells
    success; a worker returns {"ok": False, "error_type", "message"} for a caught error)."""
    pending: OrderedDict[str, deque[Unit]] = OrderedDict()
    for unit in units:
        pending.setdefault(unit.checkpoint, deque()).append(unit)
    actors = [make_actor() for _ in range(min(num_actors, len(units)))]
    current: dict[int, str | None] = {id(a): None for a in actors}
    in_flight: dict[ray.ObjectRef, tuple[object, Unit]] = {}

    def next_unit(actor) -> Unit | None:
        own = current[id(actor)]
        if pending.get(own):
            return pending[own].popleft()
        busy = {current[id(a)] for a, _ in in_flight.values()}
        fresh = [c for c, queue in pending.items() if queue and c not in busy]
        candidates = fresh or sorted((c for c, q in pending.items() if q), key=lambda c: -len(pending[c]))
        if not candidates:
            return None
        current[id(actor)] = candidates[0]
        return pending[candidates[0]].popleft()

    def dispatch(actor) -> None:
        unit = next_unit(actor)
        if unit is not None:
            in_flight[submit(actor, unit)] = (actor, unit)

    for actor in actors:
        dispatch(actor)
    while in_flight:
        (ready,), _ = ray.wait(list(in_flight), num_returns=1)
        actor, unit = in_flight.pop(ready)
        try:
            result = ray.get(ready)
        except (RayActorError, RayTaskError) as e:
            result = {"ok": False, "error_type": type(e).__name__, "message": str(e)[-2000:]}
            if isinstance(e, RayActorError):  # the process died (OOM, segfault): replace it
                replacement = make_actor()
                actors[actors.index(actor)] = replacement
                current[id(replacement)] = None
        if not result["ok"] and unit.attempt < max_retries:
            unit.attempt += 1
            pending.setdefault(unit.checkpoint, deque()).appendleft(unit)
        else:
            on_done(unit, result)
        busy = {id(a) for a, _ in in_flight.values()}
        for idle in [a for a in actors if id(a) not in busy]:
            dispatch(idle)
