"""Run untrusted generated code; passed = exit status 0 within the timeout.

Where bubblewrap works, each run gets its own PID, mount, network, IPC and UTS namespaces: the
program sees only its own processes, read-only /usr, /lib*, /bin and Python's install prefix, a
fresh /proc, a minimal /dev and a private tmpfs /tmp as its working directory (nothing it writes
reaches the host), and no network but its own loopback. As root, bubblewrap builds the namespaces
and `setpriv` drops the program to uid 65534 (root ignores file modes, and the kernel never applies
RLIMIT_NPROC to uid 0); as another user, bubblewrap's user namespace keeps that user's uid. A fresh
cgroup per run (v2, else v1, where writable) caps memory and process count of the whole tree and
is killed whole when the run ends.

Without bubblewrap `run_python` refuses (SandboxError, which says how to install it), unless
`unisolated=True` (`eval.sandbox=unisolated`): then it falls back to a subprocess in its own
session with per-process rlimits, as root under uid 65534 where the interpreter allows,
`unshare --net` where user namespaces work and a Python-level socket guard, which does not stop a
hostile program from reading files, writing outside its directory, reaching host unix sockets or
signalling the worker. `sandbox_guarantees()` reports what holds on this machine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import PurePosixPath

from moegrok.errors import SandboxError
from moegrok.evaluation.cgroups import cgroup_parents, kill_and_remove, make_run_cgroups

SANDBOX_UID = 65534  # "nobody": owns no files and no other processes
MAX_PROCESSES = 64  # the whole tree, bubblewrap's own two processes included
MAX_FILE_BYTES = 16 << 20  # also bounds the captured output, which goes to a file
OUTPUT_CHARS = 2000
SANDBOX_PROGRAM = "/tmp/program.py"

NO_NETWORK_PRELUDE = """\
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the moegrok sandbox")
_socket.socket = _socket.create_connection = _socket.getaddrinfo = _no_network
del _socket, _no_network
"""

log = logging.getLogger(__name__)
INSTALL = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; `make check-machine` says what this "
           "machine has), or set eval.sandbox=unisolated to run generated code without isolation")


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    returncode: int | None
    timed_out: bool
    output: str
    reason: str = ""  # why it failed: timeout, out of memory, signal or exit status; "" when passed


@dataclass(frozen=True)
class SandboxGuarantees:
    """What isolation `run_python` gets on this machine (probed once per process)."""

    namespaces: bool  # bubblewrap: own PID/mount/network/IPC/UTS namespaces, read-only filesystem
    uid: int  # the uid the program runs as
    memory_cgroup: int | None  # version of the cgroup capping the whole tree; None: RLIMIT_AS per process
    process_bound: str  # what bounds the number of processes; starts with "none" when nothing does
    network: str
    fallback: str  # why the namespace sandbox is not used; "" when it is

    def __str__(self) -> str:
        memory = (f"cgroup v{self.memory_cgroup}, the whole process tree" if self.memory_cgroup
                  else "RLIMIT_AS per process only: children together can exceed it")
        lines = [f"namespaces:    {'pid, mount, net, ipc, uts (bubblewrap)' if self.namespaces else 'none'}",
                 f"runs as uid:   {self.uid}", f"memory cap:    {memory}",
                 f"process bound: {self.process_bound}", f"network:       {self.network}"]
        return "\n".join(lines + ([f"fallback:      {self.fallback}"] if self.fallback else []))


# ---- the command ------------------------------------------------------------------------------


def _interpreter() -> str:
    """The base interpreter, not a virtualenv's (whose packages and .pth files point into the
    project checkout): the program gets the standard library only."""
    base = os.path.join(os.path.realpath(sys.base_prefix), "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
    return base if os.path.exists(base) else os.path.realpath(sys.executable)


def _bwrap_command(*, program: str, memory_mb: int, nproc_inside: bool, sync_fd: int) -> list[str]:
    """bubblewrap around `program`: read-only system and interpreter, fresh /tmp, /proc and /dev;
    `sync_fd` stays open until the sandbox's last process is gone."""
    command = ["bwrap", "--sync-fd", str(sync_fd),
               "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
               "--die-with-parent", "--new-session", "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: /bin -> usr/bin
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    prefix = os.path.realpath(sys.base_prefix)
    if not prefix.startswith("/usr/"):
        # e.g. /root/.pyenv/versions/3.11.7: the prefix alone, below fresh world-traversable parents
        for parent in reversed(PurePosixPath(prefix).parents[:-1]):
            command += ["--perms", "0755", "--dir", str(parent)]
        command += ["--ro-bind", prefix, prefix]
    command += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(memory_mb << 20),
                "--tmpfs", "/tmp", "--ro-bind", program, SANDBOX_PROGRAM, "--remount-ro", "/", "--chdir", "/tmp",
                "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
                "--setenv", "PYTHONHASHSEED", "0"]
    if os.geteuid() == 0:
        # bubblewrap runs privileged (a user namespace made by root could not map uid 65534); only
        # setpriv gets the capabilities to switch uid, and the switch drops them
        command += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP",
                    "setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--"]
    else:
        command[1:1] = ["--unshare-user", "--disable-userns"]
        if nproc_inside:  # counted in the run's own user namespace: this run's processes only
            command += ["prlimit", f"--nproc={MAX_PROCESSES}", "--"]
    return [*command, _interpreter(), "-I", "-B", SANDBOX_PROGRAM]


def _enter_limits(procs_files: tuple[str, ...], rlimits: tuple[tuple[int, int], ...], uid: int | None) -> None:
    """Runs in the child between fork and exec: join the run's cgroups (while still root), lower
    the rlimits, then drop to `uid`. Imports nothing: another thread may hold the import lock."""
    for path in procs_files:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    for which, value in rlimits:
        resource.setrlimit(which, (value, value))
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)


@functools.cache
def _unshare_net_available() -> bool:
    """Whether `unshare --net --map-root-user` works here (it needs user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--net", "--map-root-user", "true"], capture_output=True).returncode == 0


# ---- running ----------------------------------------------------------------------------------


def _reason(returncode: int, *, timed_out: bool, oom_killed: bool, timeout_s: float, memory_mb: int,
            namespaces: bool) -> str:
    if timed_out:
        return f"timed out after {timeout_s:g} s"
    if returncode == 0:
        return ""
    if oom_killed:
        return f"out of memory: the process tree reached its {memory_mb} MiB cap"
    signum = -returncode
    if namespaces and returncode > 128:  # bubblewrap reports death by signal N as exit status 128 + N
        signum = returncode - 128
    if signum in signal.valid_signals():
        return f"killed by {signal.Signals(signum).name}"
    return f"exit status {returncode}"


def _wait_until_closed(fd: int, *, timeout_s: float) -> None:
    """Read `fd` until every writer has closed it or `timeout_s` passes. bubblewrap's PID-namespace
    init holds its --sync-fd until it exits, which the kernel lets happen only once every other
    process of the namespace is gone."""
    end = time.monotonic() + timeout_s
    while (left := end - time.monotonic()) > 0 and select.select([fd], [], [], left)[0]:
        if not os.read(fd, 4096):
            return


def _run(code: str, *, timeout_s: float, memory_mb: int, namespaces: bool, drop_to: int | None) -> SandboxResult:
    """One run; `drop_to` is the fallback's uid switch (with namespaces setpriv switches inside)."""
    has_pids_cgroup = "pids" in cgroup_parents()
    rlimits = [(resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, int(timeout_s) + 1),
               (resource.RLIMIT_FSIZE, MAX_FILE_BYTES), (resource.RLIMIT_CORE, 0)]
    if os.geteuid() == 0 and not has_pids_cgroup:  # counts from the switch to uid 65534 on
        rlimits.append((resource.RLIMIT_NPROC, MAX_PROCESSES))
    with tempfile.TemporaryDirectory(prefix="moegrok-sandbox-") as workdir:
        program, output_path = os.path.join(workdir, "program.py"), os.path.join(workdir, "output.txt")
        with open(program, "w") as f:
            f.write(code if namespaces else NO_NETWORK_PRELUDE + code)
        sync_read, sync_write = os.pipe()
        if namespaces:
            nproc_inside = not has_pids_cgroup and shutil.which("prlimit") is not None
            command = _bwrap_command(program=program, memory_mb=memory_mb, nproc_inside=nproc_inside,
                                     sync_fd=sync_write)
        else:
            command = [_interpreter(), "-I", "-B", program]
            if _unshare_net_available():
                command = ["unshare", "--net", "--map-root-user", *command]
            if drop_to is not None:  # its working directory
                os.chown(workdir, drop_to, drop_to)
        groups = make_run_cgroups(memory_mb=memory_mb, max_processes=MAX_PROCESSES)
        procs_files = tuple(os.path.join(group.path, "cgroup.procs") for group in groups)
        try:
            with open(output_path, "wb") as output:
                process = subprocess.Popen(
                    command, cwd=workdir, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0"},
                    start_new_session=True, pass_fds=(sync_write,) if namespaces else (),
                    preexec_fn=functools.partial(_enter_limits, procs_files, tuple(rlimits), drop_to),
                )
            os.close(sync_write)
            # a pidfd turns readable when the process exits, before it is reaped: its process
            # group id cannot have been reused by the time of the kill below
            pidfd = os.pidfd_open(process.pid)
            try:
                timed_out = not select.select([pidfd], [], [], timeout_s)[0]
            finally:
                os.close(pidfd)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            _wait_until_closed(sync_read, timeout_s=5.0)
        finally:
            os.close(sync_read)
            with contextlib.suppress(OSError):  # already closed unless Popen failed
                os.close(sync_write)
            oom_killed = kill_and_remove(groups)
        with open(output_path, "rb") as f:
            f.seek(max(0, os.path.getsize(output_path) - 4 * OUTPUT_CHARS))
            text = f.read().decode(errors="replace")[-OUTPUT_CHARS:]
    reason = _reason(process.returncode, timed_out=timed_out, oom_killed=oom_killed, timeout_s=timeout_s,
                     memory_mb=memory_mb, namespaces=namespaces)
    return SandboxResult(not timed_out and process.returncode == 0, process.returncode, timed_out, text, reason)


def _probe(*, namespaces: bool, drop_to: int | None) -> SandboxResult:
    return _run("pass", timeout_s=30.0, memory_mb=256, namespaces=namespaces, drop_to=drop_to)


def _namespace_problem() -> str:
    """Why the bubblewrap sandbox cannot be used here; "" when a trivial program runs in it."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    probe = _probe(namespaces=True, drop_to=None)
    return "" if probe.passed else f"bubblewrap fails here ({probe.reason}): {probe.output.strip()[-300:]}"


@functools.cache
def _fallback_uid() -> int | None:
    """The fallback's uid switch: to 65534 as root, unless the interpreter is out of its reach
    (e.g. under /root, mode 0700); then the program runs as root."""
    if os.geteuid() != 0:
        return None
    try:
        reachable = _probe(namespaces=False, drop_to=SANDBOX_UID).passed
    except PermissionError:  # the interpreter itself cannot be executed as that uid
        reachable = False
    return SANDBOX_UID if reachable else None


@functools.cache
def sandbox_guarantees() -> SandboxGuarantees:
    """Probe once which isolation `run_python` gets on this machine; warn once if it is the fallback."""
    fallback = _namespace_problem()
    parents = cgroup_parents()
    if not fallback:
        uid = SANDBOX_UID if os.geteuid() == 0 else os.geteuid()
    else:
        uid = os.geteuid() if _fallback_uid() is None else SANDBOX_UID
    if "pids" in parents:
        process_bound = f"cgroup v{parents['pids'][1]} pids.max = {MAX_PROCESSES} per run"
    elif os.geteuid() == 0 and uid == SANDBOX_UID:
        process_bound = f"RLIMIT_NPROC = {MAX_PROCESSES} for uid {SANDBOX_UID}, shared by concurrent runs"
    elif not fallback and shutil.which("prlimit"):
        process_bound = f"RLIMIT_NPROC = {MAX_PROCESSES} in the run's own user namespace"
    elif uid == 0:
        process_bound = "none: no writable pids cgroup, and root is exempt from RLIMIT_NPROC"
    else:
        process_bound = f"none: no writable pids cgroup, and RLIMIT_NPROC would count all of uid {uid}'s processes"
    if not fallback:
        network = "own network namespace: loopback only, no host unix sockets"
    elif _unshare_net_available():
        network = "own network namespace (unshare --net) and a Python-level socket guard"
    else:
        network = "Python-level socket guard only: the _socket module bypasses it"
    guarantees = SandboxGuarantees(
        namespaces=not fallback, uid=uid, memory_cgroup=parents["memory"][1] if "memory" in parents else None,
        process_bound=process_bound, network=network, fallback=fallback,
    )
    return guarantees


def require_isolation() -> None:
    """Raise SandboxError, saying how to fix it, when generated code cannot run isolated here."""
    problem = sandbox_guarantees().fallback
    if problem:
        raise SandboxError(f"generated code cannot run isolated on this machine ({problem}): {INSTALL}")


@functools.cache
def _warn_unisolated() -> None:
    log.warning("moegrok sandbox: generated code runs WITHOUT isolation (eval.sandbox=unisolated): %s\n%s",
                sandbox_guarantees().fallback, sandbox_guarantees())


def network_namespace_available() -> bool:
    """Whether the program gets its own network namespace (bubblewrap, else `unshare --net`)."""
    return sandbox_guarantees().namespaces or _unshare_net_available()


def run_python(code: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
               unisolated: bool = False) -> SandboxResult:
    """Run `code` with a fresh base Python (-I: isolated; standard library only) in the bubblewrap
    sandbox; passed = exit status 0. Without namespaces it raises SandboxError, unless `unisolated`
    (then the weaker fallback, logged once). `memory_mb` caps the whole process tree where a memory
    cgroup is writable, else each process."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be at least 64 (the interpreter needs it), got {memory_mb!r}")
    namespaces = sandbox_guarantees().namespaces
    if not namespaces:
        if not unisolated:
            require_isolation()
        _warn_unisolated()
    drop_to = None if namespaces else _fallback_uid()
    return _run(code, timeout_s=timeout_s, memory_mb=memory_mb, namespaces=namespaces, drop_to=drop_to)
