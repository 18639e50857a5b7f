"""A node lost in the middle of a sweep, on a real multi-node Ray (`ray.cluster_utils.Cluster`:
several raylets on this machine). The sweep runs in a fresh process, which owns its cluster; the
reference is the same sweep on the session's Ray."""

import multiprocessing
import threading
import time
from pathlib import Path

import pandas as pd

from moegrok.pipeline import run_sweep
from tests.reference.toy import tiny_sweep_config

SETTINGS = ("eval.enabled=false", "metrics.routing_analyses.enabled=false", "samples.shard_size=4")
STAGES = ["record", "reduce"]  # what a lost node's actor interrupts, and the tables it feeds


def sweep_losing_a_node(zoo: Path, run_dir: Path, *, remove_after: int) -> int:
    """Record and reduce the tiny zoo on a head without CPUs and two one-CPU workers, each with one
    `slot` that a record actor needs (so the two actors spread over the two nodes); after
    `remove_after` finished units, remove the first worker node."""
    import ray
    from ray.cluster_utils import Cluster

    # health checks every 0.5 s, a node dead after 2 missed: the loss is noticed in a second, not 15
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2}})
    workers = [cluster.add_node(num_cpus=1, resources={"slot": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    cfg = tiny_sweep_config(zoo, run_dir, *SETTINGS, f"cluster.address={cluster.address}", "record.num_actors=2",
                            "+record.resources.slot=1")

    def remove_a_node() -> None:
        while len(list(run_dir.glob("routing/*/.*.done"))) < remove_after:
            time.sleep(0.05)
        cluster.remove_node(workers[0])

    threading.Thread(target=remove_a_node, daemon=True).start()
    status = run_sweep(cfg, stages=STAGES)
    ray.shutdown()
    cluster.shutdown()
    return status


def test_a_sweep_survives_the_loss_of_a_node(tiny_zoo, tmp_path, ray_cluster):
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        status = pool.apply(sweep_losing_a_node, (tiny_zoo, tmp_path / "lost"), {"remove_after": 3})
    assert status == 0  # no unit failed: the lost actor's unit ran again on the live node
    assert run_sweep(tiny_sweep_config(tiny_zoo, tmp_path / "whole", *SETTINGS), stages=STAGES) == 0
    for table in ("metrics.parquet", "memorized.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "lost" / table),
                                      pd.read_parquet(tmp_path / "whole" / table))
    features = {name: pd.read_parquet(tmp_path / name / "sample_metrics").sort_values(["step", "sample_id"],
                                                                                     ignore_index=True)
                for name in ("lost", "whole")}
    pd.testing.assert_frame_equal(features["lost"], features["whole"])
