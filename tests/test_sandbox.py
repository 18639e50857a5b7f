import time

from moegrok.evaluation.sandbox import network_namespace_available, run_python


def test_passing_and_failing_programs():
    assert run_python("assert 1 + 1 == 2").passed
    failed = run_python("assert 1 + 1 == 3, 'wrong'")
    assert not failed.passed and "wrong" in failed.output


def test_infinite_loop_is_killed():
    start = time.monotonic()
    result = run_python("while True:\n    pass", timeout_s=1.0)
    assert result.timed_out and not result.passed
    assert time.monotonic() - start < 5


def test_children_are_killed_with_the_program(tmp_path):
    marker = tmp_path / "child-alive"
    child = f"import time; time.sleep(3); open({str(marker)!r}, 'w')"
    code = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(60)\n"
    assert run_python(code, timeout_s=1.0).timed_out
    time.sleep(4)
    assert not marker.exists()


def test_network_is_blocked():
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
        "s.settimeout(3)\n"
        "s.connect(('1.1.1.1', 80))\n"
    )
    result = run_python(code)
    assert not result.passed and ("disabled" in result.output or "unreachable" in result.output)


def test_raw_socket_module_blocked_by_the_namespace():
    if not network_namespace_available():
        return  # only the Python-level guard applies on this kernel; covered above
    code = (
        "import _socket\n"
        "s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
        "s.settimeout(3)\n"
        "s.connect(('1.1.1.1', 80))\n"
    )
    result = run_python(code)
    assert not result.passed and "unreachable" in result.output


def test_memory_limit():
    assert not run_python("x = bytearray(2 << 30)", memory_mb=256).passed
