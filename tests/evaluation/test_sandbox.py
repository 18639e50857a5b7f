"""The sandbox against hostile programs: each fixture is a program that tries one escape, each test
asserts what the program got (nothing) as seen from outside the sandbox."""

import ast
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from moegrok.evaluation.sandbox import MAX_PROCESSES, network_namespace_available, sandbox_guarantees
from moegrok.evaluation.sandbox import run_python as run_in_sandbox

CHECKOUT = Path(__file__).resolve().parents[2]
GUARANTEES = sandbox_guarantees()
needs_namespaces = pytest.mark.skipif(not GUARANTEES.namespaces, reason=f"no namespace sandbox: {GUARANTEES.fallback}")


def _processes_with(token: str) -> list[int]:
    """Live processes whose command line holds `token` (the host sees every PID namespace)."""
    pids = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and token.encode() in Path("/proc", entry, "cmdline").read_bytes():
                pids.append(int(entry))
    return pids


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pending_connection(server: socket.socket) -> bool:
    server.setblocking(False)
    try:
        connection, _ = server.accept()
    except BlockingIOError:
        return False
    connection.close()
    return True


def _delegated_cgroup_controllers() -> set[str]:
    """memory/pids controllers a child of this process's cgroup can get, read from /proc
    independently of the sandbox's own probe: v1 hierarchies mounted read-write, and on cgroup2
    what this process's cgroup hands to its children."""
    own_v2 = [line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
              if line.startswith("0::")]
    found = set()
    for line in Path("/proc/mounts").read_text().splitlines():
        _source, mount_point, fstype, options = line.split()[:4]
        if "rw" not in options.split(","):
            continue
        if fstype == "cgroup":
            found |= {"memory", "pids"} & set(options.split(","))
        elif fstype == "cgroup2" and own_v2:
            subtree_control = Path(mount_point + own_v2[0], "cgroup.subtree_control").read_text().split()
            found |= {"memory", "pids"} & set(subtree_control)
    return found


# ---- hostile programs ----------------------------------------------------------------------------


@pytest.fixture
def fork_bomb() -> str:
    return (
        "import os, time\n"
        "children = 0\n"
        "try:\n"
        "    for _ in range(200):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(5)\n"
        "            os._exit(0)\n"
        "        children += 1\n"
        "except OSError as error:\n"
        "    print(f'fork refused after {children} children: {error}')\n"
        "    raise SystemExit(1)\n"
        "print(f'forked {children} children')\n"
    )


@pytest.fixture
def parent_kill() -> str:
    """Signals the evaluation worker by its PID and by getppid(); exits 0 only if both went through."""
    return (
        "import os, signal\n"
        f"os.kill({os.getpid()}, signal.SIGUSR1)\n"
        "os.kill(os.getppid(), signal.SIGUSR1)\n"
    )


@pytest.fixture
def escape_targets(tmp_path) -> list[Path]:
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    token = uuid.uuid4().hex
    # the interpreter's prefix is visible inside the sandbox, read-only; the others are not visible
    targets = [readonly / "escape.txt", CHECKOUT / f"escape-{token}.txt", Path("/tmp") / f"moegrok-escape-{token}",
               Path(os.path.realpath(sys.base_prefix)) / f"moegrok-escape-{token}"]
    yield targets
    for target in targets:
        target.unlink(missing_ok=True)
    readonly.chmod(0o755)


@pytest.fixture
def secret_file(tmp_path) -> Path:
    secret = tmp_path / "secret.txt"
    secret.write_text(f"SECRET-{uuid.uuid4().hex}")
    return secret


def _reader(paths: list[str]) -> str:
    """Prints, as JSON, what it could read of each path (file text or directory listing) or the error."""
    return (
        "import json, os\n"
        "seen = {}\n"
        f"for path in {paths!r}:\n"
        "    try:\n"
        "        seen[path] = sorted(os.listdir(path)) if os.path.isdir(path) else open(path).read(200)\n"
        "    except OSError as error:\n"
        "        seen[path] = type(error).__name__\n"
        "print(json.dumps(seen))\n"
    )


@pytest.fixture
def unix_servers(tmp_path):
    """A listening unix socket at a path (mode 0777, so only visibility stops a client) and an
    abstract one."""
    path = str(tmp_path / "server.sock")
    abstract = f"\0moegrok-test-{uuid.uuid4().hex}"
    servers = []
    for address in (path, abstract):
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address)
        server.listen(8)
        servers.append(server)
    os.chmod(path, 0o777)
    yield {path: servers[0], abstract: servers[1]}
    for server in servers:
        server.close()


def _connector(family: str, addresses: list) -> str:
    """Connects with the raw _socket module (no Python-level guard applies); exits 0 if any worked."""
    return (
        "import _socket\n"
        "connected = []\n"
        f"for address in {addresses!r}:\n"
        f"    s = _socket.socket(_socket.{family}, _socket.SOCK_STREAM)\n"
        "    s.settimeout(3)\n"
        "    try:\n"
        "        s.connect(address)\n"
        "        connected.append(address)\n"
        "    except OSError as error:\n"
        "        print(repr(address), error)\n"
        "print('connected to', connected)\n"
        "raise SystemExit(0 if connected else 1)\n"
    )


@pytest.fixture
def setsid_survivor() -> tuple[str, str]:
    token = f"moegrok-survivor-{uuid.uuid4().hex}"
    child = [sys.executable, "-c", "import time; time.sleep(30)", token]
    code = (
        "import subprocess, sys, time\n"
        f"child = [sys.executable] + {child[1:]!r}\n"
        "subprocess.Popen(child, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "time.sleep(60)\n"
    )
    yield code, token
    _kill_all(_processes_with(token))


@pytest.fixture
def memory_spread_over_children() -> str:
    """4 children of 700 MiB each (written, so really resident), held together for half a second."""
    return (
        "import os, time\n"
        "pids = []\n"
        "for _ in range(4):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = b'x' * (700 << 20)\n"
        "        time.sleep(0.5)\n"
        "        os._exit(0)\n"
        "    pids.append(pid)\n"
        "statuses = [os.waitpid(pid, 0)[1] for pid in pids]\n"
        "print('child wait statuses', statuses)\n"
        "raise SystemExit(0 if statuses == [0, 0, 0, 0] else 1)\n"
    )


def run_python(code: str, **kwargs):
    """The strongest sandbox this machine has, the fallback allowed where bubblewrap is missing
    (run_python's default refusal is tested on its own, below)."""
    return run_in_sandbox(code, unisolated=True, **kwargs)


# ---- ordinary programs ---------------------------------------------------------------------------


def test_passing_and_failing_programs():
    assert run_python("assert 1 + 1 == 2").passed
    failed = run_python("assert 1 + 1 == 3, 'wrong'")
    assert not failed.passed and "wrong" in failed.output and failed.reason == "exit status 1"


def test_infinite_loop_is_killed():
    result = run_python("while True:\n    pass", timeout_s=1.0)
    assert result.timed_out and not result.passed and result.reason == "timed out after 1 s"


def test_children_are_killed_with_the_program():
    token = f"moegrok-child-{uuid.uuid4().hex}"
    code = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', {token!r}])\n"
        "time.sleep(60)\n"
    )
    try:
        assert run_python(code, timeout_s=1.0).timed_out
        assert _processes_with(token) == []
    finally:
        _kill_all(_processes_with(token))


def _host_server() -> socket.socket:
    """A listening server on the host's loopback: reachable from the host, so a sandboxed program
    that cannot reach it was stopped by the sandbox, not by an offline machine."""
    return socket.create_server(("127.0.0.1", 0))


def _connect_program(module: str, port: int) -> str:
    return (f"import {module} as sock\n"
            f"s = sock.socket(sock.AF_INET, sock.SOCK_STREAM)\n"
            "s.settimeout(3)\n"
            f"s.connect(('127.0.0.1', {port}))\n")


def test_network_is_blocked():
    with _host_server() as server:
        program = _connect_program("socket", server.getsockname()[1])
        outside = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
        assert outside.returncode == 0 and _pending_connection(server), outside.stderr  # the host reaches it
        result = run_python(program)
        assert not result.passed and any(word in result.output for word in ("disabled", "refused", "unreachable"))
        assert not _pending_connection(server)


def test_raw_socket_module_blocked_by_the_namespace():
    if not network_namespace_available():
        pytest.skip("no network namespace here: only the Python-level guard applies (test_network_is_blocked)")
    with _host_server() as server:
        result = run_python(_connect_program("_socket", server.getsockname()[1]))  # no Python-level guard applies
        assert not result.passed and ("refused" in result.output or "unreachable" in result.output), result.output
        assert not _pending_connection(server)


def test_memory_limit():
    assert not run_python("x = bytearray(2 << 30)", memory_mb=256).passed


def test_standard_library_works_inside():
    code = (
        "import json, sqlite3, ssl, subprocess, sys, tempfile\n"
        "print(subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True).stdout)\n"
        "tempfile.TemporaryFile().write(b'scratch')\n"
    )
    result = run_python(code)
    assert result.passed and "42" in result.output, result.output


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="timeout_s must be positive, got 0"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match=r"memory_mb must be at least 64 \(the interpreter needs it\), got 8"):
        run_python("pass", memory_mb=8)


# ---- what this machine guarantees ----------------------------------------------------------------


def test_guarantees_report_names_each_protection():
    report = str(GUARANTEES)
    for label in ("namespaces:", "runs as uid:", "memory cap:", "process bound:", "network:"):
        assert label in report
    assert ("fallback:" in report) == (not GUARANTEES.namespaces)


def test_isolation_is_active_where_the_machine_allows_it():
    """The hostile-program tests skip where a protection is unavailable; this makes sure they do
    not skip on a machine (like CI) that has bubblewrap and, as root, cgroups it can write."""
    if shutil.which("bwrap"):
        assert GUARANTEES.namespaces, GUARANTEES.fallback
    if GUARANTEES.namespaces:
        assert GUARANTEES.uid != 0
    if os.geteuid() == 0:
        controllers = _delegated_cgroup_controllers()
        if "memory" in controllers:
            assert GUARANTEES.memory_cgroup is not None
        if "pids" in controllers:
            assert GUARANTEES.process_bound.startswith("cgroup")


# ---- hostile programs against the sandbox --------------------------------------------------------


@pytest.mark.skipif(GUARANTEES.process_bound.startswith("none"), reason=GUARANTEES.process_bound)
def test_fork_bomb_is_bounded(fork_bomb):
    result = run_python(fork_bomb, timeout_s=10.0)
    assert not result.passed and "fork refused after" in result.output, result.output
    children = int(result.output.split("fork refused after ")[1].split()[0])
    assert children < MAX_PROCESSES


@needs_namespaces
def test_program_cannot_signal_the_evaluation_worker(parent_kill):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        result = run_python(parent_kill)
        time.sleep(0.1)  # a signal that got through is handled by now
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == []
    assert not result.passed and "ProcessLookupError" in result.output, result.output


@needs_namespaces
def test_writes_outside_the_temp_dir_reach_nothing(escape_targets):
    code = (
        "import os\n"
        f"for path in {[str(t) for t in escape_targets]!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('escaped')\n"
        "        print('wrote', path)\n"
        "    except OSError as error:\n"
        "        print(path, type(error).__name__)\n"
        "open('inside.txt', 'w').write('allowed')\n"
        "print('inside ok')\n"
    )
    result = run_python(code)
    assert "inside ok" in result.output, result.output
    assert [target for target in escape_targets if target.exists()] == []


@needs_namespaces
def test_secrets_of_the_host_are_not_readable(secret_file):
    paths = [str(secret_file), str(secret_file.parent), str(CHECKOUT / "pyproject.toml"), str(CHECKOUT), "/root",
             "/etc/passwd"]
    result = run_python(_reader(paths))
    assert result.passed, result.output
    seen = json.loads(result.output.strip().splitlines()[-1])
    assert secret_file.read_text() not in result.output
    for path in paths[:4] + paths[5:]:
        assert seen[path] == "FileNotFoundError", (path, seen[path])
    # only the interpreter's install prefix is bound under /root, nothing else of it
    prefix = Path(os.path.realpath(sys.base_prefix))
    allowed = [prefix.relative_to("/root").parts[0]] if prefix.is_relative_to("/root") else []
    assert seen["/root"] in (allowed, "FileNotFoundError"), seen["/root"]


@needs_namespaces
def test_unix_sockets_of_the_host_are_unreachable(unix_servers):
    result = run_python(_connector("AF_UNIX", list(unix_servers)))
    assert not result.passed and "connected to []" in result.output, result.output
    assert [address for address, server in unix_servers.items() if _pending_connection(server)] == []


@needs_namespaces
def test_setsid_child_does_not_outlive_the_timeout(setsid_survivor):
    code, token = setsid_survivor
    result = run_python(code, timeout_s=1.0)
    assert result.timed_out and not result.passed
    assert _processes_with(token) == []


@pytest.mark.skipif(GUARANTEES.memory_cgroup is None, reason="no writable memory cgroup: RLIMIT_AS per process only")
def test_memory_spread_over_children_is_capped(memory_spread_over_children):
    # ~1.5 s on an idle 2-core machine; the long timeout only keeps a CPU-starved machine from
    # reporting a timeout instead of the out-of-memory kill
    result = run_python(memory_spread_over_children, memory_mb=1024, timeout_s=30.0)
    assert not result.passed, result.output
    assert result.reason.startswith("out of memory"), (result.reason, result.output)
    statuses = ast.literal_eval(result.output.split("child wait statuses ")[1].splitlines()[0])
    assert any(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL for status in statuses), statuses


@needs_namespaces
def test_inet_network_is_blocked():
    server = socket.create_server(("127.0.0.1", 0))
    try:
        result = run_python(_connector("AF_INET", [("127.0.0.1", server.getsockname()[1])]))
        assert not result.passed and "connected to []" in result.output, result.output
        assert not _pending_connection(server)
    finally:
        server.close()


def test_without_bubblewrap_code_runs_only_when_unisolated_is_asked_for(tmp_path):
    """A process whose PATH has no bwrap: run_python refuses, saying how to fix it; with
    unisolated=True the program runs in the fallback."""
    program = ("from moegrok.errors import SandboxError\n"
               "from moegrok.evaluation.sandbox import run_python\n"
               "try:\n    run_python('pass')\nexcept SandboxError as e:\n    print('refused:', e)\n"
               "print('unisolated passed:', run_python('print(6 * 7)', unisolated=True).passed)\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(CHECKOUT)})
    assert "refused: generated code cannot run isolated on this machine (bubblewrap (bwrap) is not installed)" \
        in result.stdout, result.stderr[-2000:]
    assert "unisolated passed: True" in result.stdout
