"""The jobs as users run them (subprocesses): one-line errors, a driver killed mid-record (nothing
outlives it, a second sweep is refused while it runs, a re-run resumes to the uninterrupted tables),
a failed unit's exit status, a full disk."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from moegrok.pipeline import run_sweep
from moegrok.pipeline.reaper import descendants
from moegrok.store import RunDir
from tests.reference.toy import tiny_sweep_config, tiny_sweep_overrides

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# 5 record units per checkpoint, so a kill lands in the middle of the record stage
SMALL_UNITS = ("samples.shard_size=8", "eval.enabled=false", "cluster.num_cpus=2")


def sweep_command(zoo: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "sweep.py"), *tiny_sweep_overrides(zoo, run_dir), *overrides]


def test_user_errors_are_one_line_and_exit_2(tiny_zoo, tmp_path):
    duplicated = tmp_path / "duplicated.jsonl"
    duplicated.write_text("".join(json.dumps({"id": "a", "group": "g", "text": "1 + 2 = 3"}) + "\n" for _ in "ab"))
    cases = {
        f"samples.paths=[{tmp_path / 'none.jsonl'}]": "samples.paths[0]=",
        f"samples.paths=[{duplicated}]": "duplicate sample id 'a'",
        "metrics.weight_share=1.5": "config key metrics.weight_share=1.5: expected a number in (0, 1)",
        "cluster.address=127.0.0.1:1 cluster.num_cpus=2": "config key cluster.num_cpus=2: sizes only a local Ray",
        "cluster.address=127.0.0.1:1": "cluster.address='127.0.0.1:1': no Ray cluster answers",
    }
    for override, message in cases.items():
        result = subprocess.run(sweep_command(tiny_zoo, tmp_path / "run", *override.split()), env=ENV,
                                capture_output=True, text=True)
        assert result.returncode == 2, (override, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("moegrok: ") and message in lines[0], (override, lines)


def start(command: list[str], run_dir: Path, *, markers: int) -> subprocess.Popen:
    """A sweep in the background, returned once `markers` routing units are done (a hang guard
    only: the sweep fails the test if it ends or never gets going)."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while len(list(run_dir.glob("routing/*/.*.done"))) < markers:
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the sweep never got going"
        time.sleep(0.1)
    return process


def reaper_of(pid: int) -> psutil.Process:
    """The reaper that follows the driver `pid` (it runs in a session of its own)."""
    for process in psutil.process_iter(["cmdline"]):
        if process.info["cmdline"][-2:] == ["moegrok.pipeline.reaper", str(pid)]:
            return process
    raise AssertionError(f"no reaper follows pid {pid}")


def running(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture
def broken_zoo(tiny_zoo, tmp_path) -> Path:
    """The tiny zoo with a truncated checkpoint, step3: its units fail, the others complete."""
    zoo = Path(shutil.copytree(tiny_zoo, tmp_path / "zoo"))
    weights = zoo / "step3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    return zoo


def test_a_killed_sweep_leaves_nothing_behind_and_resumes_to_the_same_tables(broken_zoo, tmp_path, ray_cluster):
    killed = RunDir(tmp_path / "killed")
    process = start(sweep_command(broken_zoo, killed.root, *SMALL_UNITS), killed.root, markers=3)
    os.kill(process.pid, signal.SIGSTOP)  # frozen mid-record: it dispatches nothing more, and holds the run dir
    started = descendants(process.pid)  # Ray's head, node agents, record actor, ...
    reaper = reaper_of(process.pid)
    try:  # while it holds the run dir, a second sweep on it stops at once, naming the first
        second = subprocess.run(sweep_command(broken_zoo, killed.root, *SMALL_UNITS), env=ENV, capture_output=True,
                                text=True)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another sweep (pid {process.pid} on " in second.stderr
    finally:
        os.kill(process.pid, signal.SIGKILL)  # the driver alone, as an OOM killer would
        process.wait()
    done_before = len(list(killed.root.glob("routing/*/.*.done")))
    assert len(started) >= 5 and 3 <= done_before < 2 * 5  # 40 samples in 5 shards, 2 good checkpoints
    reaper.wait(timeout=120)  # it kills what it followed, then exits
    assert running(started) == [], "processes of the killed sweep outlived its reaper"

    resumed = subprocess.run(sweep_command(broken_zoo, killed.root, *SMALL_UNITS), env=ENV, capture_output=True,
                             text=True)
    assert resumed.returncode == 1, resumed.stderr[-2000:]  # a failed unit: the rest completes, exit status 1
    assert "failed; see" in resumed.stdout
    failures = pd.read_parquet(killed.failures)
    assert set(failures["stage"]) == {"record"} and failures["unit"].str.startswith("step3").all()
    assert failures["message"].str.contains("truncated safetensors").all()

    whole = tiny_sweep_config(broken_zoo, tmp_path / "whole", *SMALL_UNITS[:2])  # the same, uninterrupted
    assert run_sweep(whole, stages=["record", "reduce", "analyze"]) == 1
    for name in ("metrics.parquet", "memorized.parquet", "contrast.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(killed.root / name), pd.read_parquet(Path(whole.run_dir) / name))
    features = {run: pd.read_parquet(Path(run) / "sample_metrics").sort_values(["step", "sample_id"],
                                                                                ignore_index=True)
                for run in (killed.root, whole.run_dir)}
    pd.testing.assert_frame_equal(*features.values())
    assert set(features[killed.root]["checkpoint"]) == {"step0", "step6"}
    routing = pd.concat(map(pd.read_parquet, sorted(killed.root.glob("routing/*/*.parquet"))))
    assert not routing.duplicated(["checkpoint", "sample_id"]).any() and len(routing) == 2 * 40


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_full_disk_ends_the_sweep_in_one_line(tiny_zoo, tmp_path):
    """The run dir on a 300 KiB tmpfs, mounted in a mount namespace of our own (no root needed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    command = " ".join(f"'{part}'" for part in sweep_command(tiny_zoo, disk / "run", *SMALL_UNITS))
    script = f"mount -t tmpfs -o size=300k tmpfs '{disk}' && exec {command}"
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith("moegrok: ")]
    assert len(ours) == 1 and "Traceback" not in result.stderr
    assert f"run dir {disk / 'run'}: no space left on the device" in ours[0]
