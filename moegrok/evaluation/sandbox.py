"""Run untrusted generated code: a subprocess in a temp dir with a wall-clock timeout, CPU,
memory and file-size limits, its own process group (killed whole on overrun) and no network
(a fresh network namespace via `unshare` where the kernel allows it, and sockets disabled
inside Python either way)."""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

NO_NETWORK_PRELUDE = """\
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the moegrok sandbox")
_socket.socket = _socket.create_connection = _socket.getaddrinfo = _no_network
del _socket, _no_network
"""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    returncode: int | None
    timed_out: bool
    output: str


@functools.cache
def network_namespace_available() -> bool:
    """Whether `unshare --net --map-root-user` works here (it needs user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--net", "--map-root-user", "true"], capture_output=True)
    return probe.returncode == 0


def _limits(memory_mb: int, cpu_s: int) -> None:
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(code: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `code` with a fresh Python (-I: isolated, no user site); passed = exit status 0."""
    with tempfile.TemporaryDirectory(prefix="moegrok-sandbox-") as workdir:
        program = os.path.join(workdir, "program.py")
        with open(program, "w") as f:
            f.write(NO_NETWORK_PRELUDE + code)
        command = [sys.executable, "-I", "-B", program]
        if network_namespace_available():
            command = ["unshare", "--net", "--map-root-user", *command]
        process = subprocess.Popen(
            command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0"},
            preexec_fn=functools.partial(_limits, memory_mb, int(timeout_s) + 1),
        )
        try:
            output, _ = process.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            timed_out = True
    text = output.decode(errors="replace")[-2000:]
    return SandboxResult(not timed_out and process.returncode == 0, process.returncode, timed_out, text)
