"""The jobs as users run them (subprocesses): one-line errors, a killed driver, a full disk, two
sweeps on one run dir."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moegrok.pipeline.reaper import descendants

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def monitor(zoo: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "monitor.py"), f"run_dir={run_dir}", f"checkpoints.dir={zoo}",
            f"samples.paths=[{zoo / 'samples.jsonl'}]", "samples.max_per_group=30", "samples.shard_size=4",
            "samples.max_tokens=32", "model.residue_tokens=11", "model.attn_implementation=eager", "eval=none",
            "cluster.num_cpus=2", "progress=false", "record.max_retries=0", *overrides]


def test_user_errors_are_one_line_and_exit_2(tiny_zoo, tmp_path):
    duplicated = tmp_path / "duplicated.jsonl"
    duplicated.write_text("".join(json.dumps({"id": "a", "group": "g", "text": "1 + 2 = 3"}) + "\n" for _ in "ab"))
    cases = {
        f"samples.paths=[{tmp_path / 'none.jsonl'}]": "samples.paths[0]=",
        f"samples.paths=[{duplicated}]": "duplicate sample id 'a'",
        "metrics.threshold=1.5": "config key metrics.threshold=1.5: expected a number in (0, 1)",
        "cluster.address=127.0.0.1:1": "config key cluster.num_cpus=2: sizes only a local Ray",
        "cluster.address=127.0.0.1:1 cluster.num_cpus=null": "cluster.address='127.0.0.1:1': no Ray cluster answers",
    }
    for override, message in cases.items():
        result = subprocess.run(monitor(tiny_zoo, tmp_path / "run", *override.split()), env=ENV, capture_output=True,
                                text=True)
        assert result.returncode == 2, (override, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("moegrok: ") and message in lines[0], (override, lines)


def start(command: list[str], run_dir: Path, *, markers: int) -> subprocess.Popen:
    """A sweep in the background, returned once `markers` routing units are done."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(list(run_dir.glob("routing/*/.*.done"))) < markers:
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the sweep never got going"
        time.sleep(0.2)
    return process


@pytest.mark.slow
def test_nothing_outlives_a_killed_driver(tiny_zoo, tmp_path):
    process = start(monitor(tiny_zoo, tmp_path / "run"), tmp_path / "run", markers=2)
    started = descendants(process.pid)  # Ray's head, node agents, record actor, ...
    assert len(started) >= 5
    os.kill(process.pid, signal.SIGKILL)  # the driver alone, as an OOM killer would
    process.wait()
    deadline = time.monotonic() + 15
    while alive := [pid for pid in started if Path(f"/proc/{pid}").exists()
                    and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]:
        assert time.monotonic() < deadline, f"still running 15 s after the driver died: {alive}"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_second_sweep_on_a_run_dir_is_refused(tiny_zoo, tmp_path):
    first = start(monitor(tiny_zoo, tmp_path / "run"), tmp_path / "run", markers=1)
    try:
        second = subprocess.run(monitor(tiny_zoo, tmp_path / "run"), env=ENV, capture_output=True, text=True)
        assert second.returncode == 2
        assert f"is in use by another sweep (pid {first.pid} on " in second.stderr
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_full_disk_ends_the_sweep_in_one_line(tiny_zoo, tmp_path):
    """The run dir on a 300 KiB tmpfs, mounted in a mount namespace of our own (no root needed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    command = " ".join(f"'{part}'" for part in monitor(tiny_zoo, disk / "run"))
    script = f"mount -t tmpfs -o size=300k tmpfs '{disk}' && exec {command}"
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith("moegrok: ")]
    assert len(ours) == 1 and "Traceback" not in result.stderr
    assert f"run dir {disk / 'run'}: no space left on the device" in ours[0]
