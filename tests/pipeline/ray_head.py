"""A real Ray head with the dashboard (the Jobs API), started with `ray start --head` as a user
would, on free ports and in a temp dir of its own, and stopped without touching any other Ray
on the machine."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class RayHead:
    gcs_address: str  # host:port, what `ray start --address` and ray.init take
    dashboard_url: str  # what `ray job submit --address` and JobSubmissionClient take
    temp_dir: Path

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url)

    def wait(self, job_id: str, *, timeout_s: float) -> str:
        """The job's terminal status (the job is stopped if it runs past `timeout_s`)."""
        client, deadline = self.client(), time.monotonic() + timeout_s
        while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                return f"TIMEOUT after {timeout_s:.0f} s (last status {status})"
            time.sleep(1.0)
        return status


def _own_processes(temp_dir: Path) -> list[psutil.Process]:
    """Processes of this head: every Ray process names its session dir (under temp_dir) on its
    command line."""
    own = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in process.info["cmdline"] or ()):
                own.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return own


@contextmanager
def ray_head(*, num_cpus: int):
    """`ray start --head --block` with the dashboard on a free port; yields a RayHead."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics = free_ports(7)
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats",
               f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
               f"--object-store-memory={300 * 1024**2}"]
    log = open(temp_dir / "ray_start.log", "w")  # noqa: SIM115 (open for the head's lifetime)
    # no token authentication: the head listens on 127.0.0.1 only, and the test's client and the
    # job drivers (which inherit this environment) then need no token file; no drain period on SIGTERM
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    head = RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", temp_dir)
    try:
        deadline = time.monotonic() + 300
        while True:  # ready when a job runs: the dashboard, its agent and the job supervisor are up
            if process.poll() is not None:
                raise RuntimeError(f"ray start exited {process.returncode}: "
                                   + (temp_dir / "ray_start.log").read_text()[-3000:])
            try:
                status = head.wait(head.client().submit_job(entrypoint="true"), timeout_s=120)
            except Exception as e:  # not up yet: connection refused, or the dashboard answers 500
                status = f"{type(e).__name__}: {e}"
            if status == "SUCCEEDED":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the head at {head.dashboard_url} runs no job: {status}")
            time.sleep(1.0)
        yield head
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        leftovers = _own_processes(temp_dir)  # workers and agents that left the process group
        for proc in leftovers:
            proc.terminate()
        _, alive = psutil.wait_procs(leftovers, timeout=10)
        for proc in alive:
            proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
