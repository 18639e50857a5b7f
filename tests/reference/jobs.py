"""Running the jobs as users do (subprocesses), and killing a driver as an OOM killer would: shared
by the job tests and the object-store tests."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from moegrok.pipeline.reaper import descendants
from tests.reference.toy import tiny_sweep_overrides

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

def sweep_command(zoo: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "sweep.py"), *tiny_sweep_overrides(zoo, run_dir), *overrides]


def start(command: list[str], ready: Callable[[], bool], env: dict[str, str] = ENV) -> subprocess.Popen:
    """A sweep in the background, returned once `ready()` holds (a hang guard only: the sweep fails
    the test if it ends first or never gets there)."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not ready():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the sweep never got there"
        time.sleep(0.05)
    return process


def reaper_of(pid: int) -> psutil.Process:
    """The reaper that follows the driver `pid` (it runs in a session of its own)."""
    for process in psutil.process_iter(["cmdline"]):
        if (process.info["cmdline"] or [])[-2:] == ["moegrok.pipeline.reaper", str(pid)]:
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


def kill_and_check_nothing_outlives(process: subprocess.Popen) -> None:
    """kill -9 the driver alone (as an OOM killer would); once its reaper has exited, no process the
    sweep started runs on."""
    os.kill(process.pid, signal.SIGSTOP)
    started = descendants(process.pid)  # Ray's head, node agents, actors, tasks' workers, ...
    reaper = reaper_of(process.pid)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    reaper.wait(timeout=120)  # it kills what it followed, then exits
    assert len(started) >= 5 and running(started) == [], "processes of the killed sweep outlived its reaper"
