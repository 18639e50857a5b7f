"""Ray start-up and resource requests."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path

import ray

from moegrok.config import ClusterConfig, EvalConfig, RecordConfig, TuneConfig, ray_address
from moegrok.errors import ConfigError, UserError
from moegrok.pipeline.reaper import start_reaper


def check_reachable(address: str, *, timeout_s: float) -> str:
    """The host:port that `address` ("auto", "host:port" or "ray://host:port") names, once a TCP
    connection to it succeeds within `timeout_s`; else a UserError in one line (Ray itself would
    retry a dead address without end)."""
    resolved = address
    if address == "auto":
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        resolved = os.environ.get("RAY_ADDRESS") or (current.read_text().strip() if current.exists() else "")
        if not resolved:
            raise UserError("cluster.address=auto: no running Ray cluster found (RAY_ADDRESS is unset and no "
                            "cluster was started on this machine); start one (`ray start --head`, `ray up "
                            "cluster.yaml`) or set cluster.address=host:port")
    host, _, port = resolved.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except ConnectionRefusedError:
        raise UserError(f"cluster.address={address!r}: {resolved} refused the connection: no Ray cluster "
                        "listens there") from None
    except TimeoutError:
        raise UserError(f"cluster.address={address!r}: no answer from {resolved} within {timeout_s:g} s "
                        "(cluster.connect_timeout_s)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cluster.address={address!r}: cannot reach {resolved} ({e})") from None
    return resolved


def check_cluster(cfg: ClusterConfig) -> None:
    """Before any work: sizes only for a Ray of our own, and a cluster to join that answers."""
    address = ray_address(cfg.address)
    if address == "local":
        return
    for key in ("num_cpus", "num_gpus"):
        if getattr(cfg, key) is not None:
            raise ConfigError(f"config key cluster.{key}={getattr(cfg, key)!r}: sizes only a local Ray; "
                              f"the cluster at address={address!r} brings its own resources (set it to null)")
    if not ray.is_initialized():  # a grid point runs inside the cluster it would check
        check_reachable(address, timeout_s=cfg.connect_timeout_s)


def init_ray(cfg: ClusterConfig) -> None:
    """Join the configured cluster, or start a local Ray of our own sized by the config (unless
    Ray already runs in this process, e.g. a grid point running as a Ray task). A driver started
    by `ray job submit` joins the job's cluster (`moegrok.config.ray_address`)."""
    check_cluster(cfg)
    if ray.is_initialized():
        return
    address = ray_address(cfg.address)
    # Workers' output stays in Ray's session logs (/tmp/ray/session_latest/logs): what a unit did
    # wrong reaches the sweep as its failure row, and a lost node's raylet dump is not the sweep's.
    if address != "local":
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:  # a new instance of our own, never whatever cluster last ran on this machine
        # Ray turns token authentication on for a new local cluster, and warns that it did at every
        # start: the default stays, the warning goes
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
        start_reaper()  # nothing of it outlives this process, also when it is killed


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def actor_options(workers: RecordConfig | EvalConfig | TuneConfig, *, auto_gpus: float = 1) -> dict:
    """Ray actor options of a stage's workers; num_gpus < 0 means `auto_gpus` GPUs when the
    cluster has any, else 0."""
    num_gpus = workers.num_gpus if workers.num_gpus >= 0 else (auto_gpus if cluster_has_gpus() else 0)
    return {"num_gpus": num_gpus, "num_cpus": workers.num_cpus, "resources": dict(workers.resources)}
