"""Per-run cgroups for the code sandbox: a fresh child of this process's own cgroup (v2 where the
parent hands the controller down, else v1) caps the memory and the process count of a whole
process tree, and is killed whole and removed when the run ends."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cgroup:
    path: str
    version: int
    controllers: tuple[str, ...]  # of "memory", "pids"


def _cgroup_mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, root, mount point, super options) of each cgroup mount, from /proc/self/mountinfo."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, tail = line.partition(" - ")
            fstype, _source, options = [*tail.split(), "", ""][:3]
            if fstype in ("cgroup", "cgroup2"):
                root, mount_point = fields.split()[3:5]
                mounts.append((fstype, root, mount_point, set(options.split(","))))
    return mounts


def _own_cgroup_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" its cgroup2 path."""
    with open("/proc/self/cgroup") as f:
        entries = [line.rstrip("\n").split(":", 2) for line in f]
    return {controller: path for _id, controllers, path in entries for controller in controllers.split(",")}


def _usable_parent(parent: str, *, version: int, controller: str) -> bool:
    """Whether a child cgroup made here gets `controller`. On v2 the parent must already hand it to
    its children (enabling it ourselves would change the host's hierarchy)."""
    probe = os.path.join(parent, f"moegrok-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if version == 2:
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                if controller not in f.read().split():
                    return False
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError:
        return False
    return True


@functools.cache
def cgroup_parents() -> dict[str, tuple[str, int]]:
    """Per controller ("memory", "pids"): (directory, version) under which a run's cgroup is made."""
    try:
        mounts, own = _cgroup_mounts(), _own_cgroup_paths()
    except OSError:
        return {}
    parents = {}
    for controller in ("memory", "pids"):
        for version in (2, 1):  # the unified hierarchy first, where it holds the controller
            for fstype, root, mount_point, options in mounts:
                own_path = own.get("" if version == 2 else controller)
                if own_path is None or fstype != ("cgroup2" if version == 2 else "cgroup"):
                    continue
                if version == 1 and controller not in options:
                    continue
                parent = os.path.normpath(os.path.join(mount_point, os.path.relpath(own_path, root)))
                if controller not in parents and _usable_parent(parent, version=version, controller=controller):
                    parents[controller] = (parent, version)
    return parents


def make_run_cgroups(*, memory_mb: int, max_processes: int) -> list[Cgroup]:
    """Fresh cgroups for one run, memory cap and process bound written."""
    name = f"moegrok-sandbox-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    by_parent: dict[tuple[str, int], list[str]] = {}
    for controller, parent in cgroup_parents().items():
        by_parent.setdefault(parent, []).append(controller)
    groups = []
    for (parent, version), controllers in by_parent.items():
        group = Cgroup(os.path.join(parent, name), version, tuple(controllers))
        try:
            os.mkdir(group.path)
        except OSError:
            kill_and_remove(groups)
            raise
        groups.append(group)
        limits = []
        if "memory" in controllers:  # v1: memory+swap after memory, it may never be below it
            limits = ([("memory.max", memory_mb << 20), ("memory.swap.max", 0)] if version == 2 else
                      [("memory.limit_in_bytes", memory_mb << 20), ("memory.memsw.limit_in_bytes", memory_mb << 20)])
        if "pids" in controllers:
            limits.append(("pids.max", max_processes))
        for filename, value in limits:
            path = os.path.join(group.path, filename)
            if os.path.exists(path):  # the swap files exist only with swap accounting
                with open(path, "w") as f:
                    f.write(str(value))
    return groups


def kill_and_remove(groups: list[Cgroup], *, deadline_s: float = 5.0) -> bool:
    """SIGKILL everything in the run's cgroups and remove them; returns whether the memory cgroup
    saw an out-of-memory kill."""
    oom_killed = False
    end = time.monotonic() + deadline_s
    for group in groups:
        kill_file = os.path.join(group.path, "cgroup.kill")
        if os.path.exists(kill_file):
            with open(kill_file, "w") as f:
                f.write("1")
        while time.monotonic() < end:
            with open(os.path.join(group.path, "cgroup.procs")) as f:
                pids = [int(pid) for pid in f.read().split()]
            if not pids:
                break
            for pid in pids:  # v1 has no cgroup.kill: repeat until forks in flight are gone too
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        if "memory" in group.controllers:
            with open(os.path.join(group.path, "memory.events" if group.version == 2 else "memory.oom_control")) as f:
                counts = dict(line.split() for line in f if line.strip())
            oom_killed = int(counts.get("oom_kill", 0)) > 0
        while True:
            try:
                os.rmdir(group.path)
                break
            except OSError:  # busy until the killed processes are reaped
                if time.monotonic() > end:
                    log.warning("sandbox cgroup %s still busy; left in place", group.path)
                    break
                time.sleep(0.01)
    return oom_killed
