"""A node lost in the middle of a sweep, on a real multi-node Ray (`ray.cluster_utils.Cluster`:
several raylets on this machine). The sweep runs in a fresh process, which owns its cluster."""

import multiprocessing
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import monitor_config


def sweep(zoo: Path, run_dir: Path, *, nodes: int, remove_after: int | None) -> dict:
    """Record and reduce the tiny zoo on a head without CPUs and `nodes` one-CPU workers, each with
    one `slot` that a record actor needs (so the two actors spread over two nodes); after
    `remove_after` finished units, remove the node that ran the first of them."""
    import ray
    from ray.cluster_utils import Cluster

    from moegrok.pipeline import run_monitor

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1, resources={"slot": 1}) for _ in range(nodes)]
    cluster.wait_for_nodes()
    cfg = monitor_config(zoo, run_dir, eval__enabled=False)
    cfg.cluster.address = cluster.address
    cfg.record.num_actors, cfg.record.resources, cfg.metrics.routing_analyses = 2, {"slot": 1}, False
    cfg.samples.shard_size = 4
    removed = {}

    def remove_a_node() -> None:
        while len(list(run_dir.glob("routing/*/.*.done"))) < remove_after:
            time.sleep(0.05)
        removed["time"] = time.monotonic()
        cluster.remove_node(workers[0])

    if remove_after is not None:
        threading.Thread(target=remove_a_node, daemon=True).start()
    start = time.monotonic()
    status = run_monitor(cfg)
    end = time.monotonic()
    ray.shutdown()
    cluster.shutdown()
    return {"status": status, "seconds": end - start,
            "recovery_seconds": end - removed["time"] if removed else None}


def in_a_fresh_process(**kwargs) -> dict:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(sweep, kwds=kwargs)


@pytest.mark.slow
def test_a_sweep_survives_the_loss_of_a_node(tiny_zoo, tmp_path):
    whole = in_a_fresh_process(zoo=tiny_zoo, run_dir=tmp_path / "one_node", nodes=1, remove_after=None)
    lost = in_a_fresh_process(zoo=tiny_zoo, run_dir=tmp_path / "lost", nodes=2, remove_after=3)
    assert whole["status"] == lost["status"] == 0  # no unit failed: the lost actor's unit ran again elsewhere
    assert lost["recovery_seconds"] < 120, lost
    print(f"one node: {whole['seconds']:.0f} s; two nodes, one lost: {lost['seconds']:.0f} s, "
          f"{lost['recovery_seconds']:.0f} s from the loss to the end")
    for table in ("metrics.parquet", "memorized.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "lost" / table),
                                      pd.read_parquet(tmp_path / "one_node" / table))
    routing = {name: pd.read_parquet(tmp_path / name / "sample_metrics").sort_values(["step", "sample_id"],
                                                                                    ignore_index=True)
               for name in ("lost", "one_node")}
    pd.testing.assert_frame_equal(routing["lost"], routing["one_node"])
