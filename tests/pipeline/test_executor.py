"""The one stage runner on a real local Ray: skipping, retries, failure rows, lost actors,
checkpoint affinity, for both executors."""

import functools
import os
from pathlib import Path

import pandas as pd
import pytest

from moegrok.pipeline.executor import ActorPool, TaskPool, Unit, UnitWorker, run_stage
from moegrok.store import done_fingerprint, write_text


def compute(unit: Unit, *, fail_first: int = 0, die_first: bool = False) -> dict:
    """Writes the unit's name; its first `fail_first` attempts raise, or its first attempt kills
    the process (counted in files next to the output, since a retry may run anywhere)."""
    attempts = Path(f"{unit.output}.attempts")
    count = int(attempts.read_text()) if attempts.exists() else 0
    attempts.write_text(str(count + 1))
    if die_first and count == 0:
        os._exit(1)
    if count < fail_first:
        raise ValueError(f"{unit.name}: attempt {count + 1} fails")
    write_text(f"{unit.name} by {os.getpid()}", unit.output)
    return {"pid": os.getpid()}


class Worker(UnitWorker):
    def __init__(self, fail_first: int = 0, die_first: bool = False) -> None:
        self.compute = functools.partial(compute, fail_first=fail_first, die_first=die_first)


def units(tmp_path, names=("a/0", "a/1", "b/0", "b/1"), version="v1"):
    return [Unit(name, name.split("/")[0], tmp_path / name.replace("/", "_"), {"name": name, "version": version})
            for name in names]


def actor_pool(max_retries, **worker):
    return lambda todo: ActorPool(Worker, *worker.values(), options={"num_cpus": 0.5}, num_actors=2,
                                  max_retries=max_retries)


pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.mark.parametrize("pool", ["actors", "tasks"])
def test_retries_then_failure_rows(tmp_path, pool):
    def executor(max_retries):
        if pool == "actors":
            return actor_pool(max_retries, fail_first=1)
        return lambda todo: TaskPool(functools.partial(compute, fail_first=1), options={"num_cpus": 0.5},
                                     max_in_flight=2, max_retries=max_retries)

    result = run_stage("s", units(tmp_path), executor(1), progress=False)
    assert (result.units, result.done, result.failed) == (4, 4, 0)
    assert all(Path(f"{u.output}.attempts").read_text() == "2" for u in units(tmp_path))
    again = units(tmp_path / "again")
    (tmp_path / "again").mkdir()
    result = run_stage("s", again, executor(0), progress=False)
    assert result.done == 0 and sorted(f["unit"] for f in result.failures) == ["a/0", "a/1", "b/0", "b/1"]
    assert {f["error_type"] for f in result.failures} == {"ValueError"}
    assert all("attempt 1 fails" in f["message"] for f in result.failures)
    assert not any(u.output.exists() or done_fingerprint(u.output) for u in again)


def test_done_units_are_skipped_and_changed_ones_recomputed(tmp_path, capsys):
    first = run_stage("s", units(tmp_path), actor_pool(0), progress=False)
    assert (first.done, first.skipped) == (4, 0)
    stamps = {u.output: u.output.stat().st_mtime_ns for u in units(tmp_path)}
    again = run_stage("s", units(tmp_path), actor_pool(0), progress=False)
    assert (again.done, again.skipped) == (0, 4)
    assert stamps == {u.output: u.output.stat().st_mtime_ns for u in units(tmp_path)}
    changed = units(tmp_path, names=("a/0", "a/1")) + units(tmp_path, names=("b/0", "b/1"), version="v2")
    capsys.readouterr()
    third = run_stage("s", changed, actor_pool(0), progress=False)
    assert (third.done, third.skipped) == (2, 2)
    assert done_fingerprint(tmp_path / "b_1") == changed[3].fingerprint
    assert capsys.readouterr().out == "s: recomputing 2 of 4 units: version changed (2)\n"


def test_a_lost_actor_costs_no_retry(tmp_path):
    result = run_stage("s", units(tmp_path), actor_pool(0, fail_first=0, die_first=True), progress=False)
    assert (result.done, result.failed) == (4, 0)  # every unit's first run killed its actor
    assert all(Path(f"{u.output}.attempts").read_text() == "2" for u in units(tmp_path))


def test_an_actor_finishes_a_checkpoint_before_it_moves_on(tmp_path):
    names = [f"{c}/{i}" for c in "abc" for i in range(4)]
    result = run_stage("s", units(tmp_path, names=names), actor_pool(0), progress=False)
    receipts = pd.DataFrame(result.receipts).assign(checkpoint=lambda f: f["unit"].str[0])
    assert len(receipts) == 12
    for _, runs in receipts.groupby("pid", sort=False):  # in the order the actor ran them
        switches = (runs["checkpoint"] != runs["checkpoint"].shift()).sum()
        assert switches == runs["checkpoint"].nunique()  # never back to a checkpoint it left


class Broken(UnitWorker):
    def __init__(self) -> None:
        raise ValueError("this engine never loads")


def test_an_actor_that_never_starts_fails_its_units_with_the_reason(tmp_path):
    pool = ActorPool(Broken, options={"num_cpus": 0.5}, num_actors=2, max_retries=3)
    result = run_stage("s", units(tmp_path), lambda todo: pool, progress=False)
    assert result.done == 0 and result.failed == 4
    assert all("no Broken actor starts" in f["message"] and "this engine never loads" in f["message"]
               for f in result.failures)
