"""Shared tiny fixtures: a toy zoo trained for a few steps, a local Ray cluster (helpers in tests/helpers.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import tiny_toy_config


def pytest_collection_modifyitems(items):
    """Tests on the local Ray cluster carry the `ray` marker (`make test-fast` leaves them out)."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A trained tiny zoo directory with checkpoints step0, step3, step6."""
    from moegrok.toy.train import train_toy

    return train_toy(tiny_toy_config(tmp_path_factory.mktemp("zoo") / "tiny"), progress=False)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with small resources, shared by the session."""
    import ray

    from moegrok.config import ClusterConfig
    from moegrok.pipeline.cluster import init_ray

    init_ray(ClusterConfig(num_cpus=2, num_gpus=0))
    yield
    ray.shutdown()
