"""Ray start-up and resource requests."""

from __future__ import annotations

import logging
import os

import ray

from moegrok.config import ClusterConfig


def init_ray(cfg: ClusterConfig) -> None:
    """Join the configured cluster, or start a local Ray of our own sized by the config (unless
    Ray already runs in this process)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    logging.getLogger("ray").setLevel(logging.WARNING)
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=True)
    else:  # "local": a new instance of our own, never whatever cluster last ran on this machine
        ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False,
                 log_to_driver=True)


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def actor_options(num_gpus: float, num_cpus: float, *, auto_gpus: float = 1) -> dict:
    """Ray actor options; num_gpus < 0 means `auto_gpus` GPUs when the cluster has any, else 0."""
    if num_gpus < 0:
        num_gpus = auto_gpus if cluster_has_gpus() else 0
    return {"num_gpus": num_gpus, "num_cpus": num_cpus}
