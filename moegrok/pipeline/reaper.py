"""Kill what a sweep started once its driver is gone, even if the driver was killed (kill -9).

Ray ends a local cluster's workers when the driver dies, but its node agents wait up to 60 s to
report the raylet's death before they exit, and children of workers (a vLLM engine, a sandbox)
can be orphaned. `start_reaper()` starts a small process in its own session that keeps a list of
the driver's descendants while the driver lives and kills the ones still running when it dies.

    python -m moegrok.pipeline.reaper DRIVER_PID     # what start_reaper runs
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): a pid reused later differs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(child) for child in (task / "children").read_text().split()]
    return children


def descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every living descendant of `pid`."""
    found, stack = {}, _children(pid)
    while stack:
        child = stack.pop()
        if child not in found and (start := _start_time(child)) is not None:
            found[child] = start
            stack += _children(child)
    return found


def _freeze_tree(known: dict[int, str]) -> None:
    """Stop every known process that still runs, then every descendant of one that appears, until
    no new one does: a worker started a moment before the driver died is caught too, and nothing
    frozen can start another."""
    frozen: set[int] = set()
    while True:
        for pid in list(known):
            if pid not in frozen and pid != os.getpid() and _start_time(pid) == known[pid]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGSTOP)
                frozen.add(pid)
        new = {child: start for pid in frozen for child, start in descendants(pid).items() if child not in known}
        if not new:
            return
        known.update(new)


def watch(driver: int, *, interval_s: float = 1.0) -> int:
    """Follow `driver`'s descendants until it exits, then kill the ones still running and any
    descendant of theirs (`_freeze_tree`); returns how many it killed."""
    try:
        pidfd = os.pidfd_open(driver)
    except ProcessLookupError:
        return 0
    known: dict[int, str] = {}
    while not select.select([pidfd], [], [], interval_s)[0]:
        known.update(descendants(driver))
    os.close(pidfd)
    _freeze_tree(known)
    killed = 0
    for pid, start in known.items():
        if pid != os.getpid() and _start_time(pid) == start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


def start_reaper() -> subprocess.Popen:
    """Watch this process from a process of its own (outside its process group and session)."""
    return subprocess.Popen([sys.executable, "-m", "moegrok.pipeline.reaper", str(os.getpid())],
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
