"""The Ray pipeline's record + reduce vs a plain single-process loop over the same checkpoints.

    python benchmarks/sweep_overhead.py [--zoo zoo/default] [--checkpoints 18] [--per-group 1000]

Plain loop: load each checkpoint, RoutingRecorder over the samples, then the reduce stage's
functions (features, memorized set, group rows) in-process. Pipeline: run_sweep's record and
reduce stages (the same work, plus Parquet files, resumability and failure rows) with 1 record
actor on a local Ray whose start-up is excluded. Both run on 3 and on --checkpoints
checkpoints, so the pipeline's cost splits into a fixed part (actor start-up, the reduce
tasks' imports) and a per-checkpoint part; the target (<= 1.3x) is the per-checkpoint ratio, the cost
of a large sweep. Then 2 actors on the large size.
"""

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from moegrok.config import ClusterConfig, SweepConfig, compose_config
from moegrok.data.checkpoints import build_catalog, load_checkpoint
from moegrok.data.samples import select_samples, tokenize_samples
from moegrok.metrics.memorization import select_memorized
from moegrok.metrics.table import checkpoint_features, group_rows
from moegrok.routing.recorder import RoutingRecorder, router_weights


def plain_loop(cfg: SweepConfig) -> float:
    """The reduce stage's computations, in one process: features, memorized set, group rows."""
    start = time.perf_counter()
    metrics = cfg.metrics
    refs = build_catalog(cfg.checkpoints)
    frame = select_samples(cfg.samples)
    samples, features = None, []
    for ref in refs:
        model, tokenizer = load_checkpoint(ref, cfg.model, cache_dir=cfg.checkpoints.cache_dir, device="cpu")
        samples = samples or tokenize_samples(frame, tokenizer, max_tokens=cfg.samples.max_tokens)
        table = RoutingRecorder(model).record(samples, checkpoint=ref.name, step=ref.step)
        features.append(checkpoint_features(table, router_weights(model).numpy(), weight_share=metrics.weight_share,
                                            positions=list(metrics.positions)))
    per_sample = pd.concat(features, ignore_index=True)
    memo = metrics.memorization
    memorized = select_memorized(per_sample[["step", "sample_id", "group", "loss"]], delta=memo.delta,
                                 eps=memo.eps, target_fraction=memo.target_fraction)
    since = dict(zip(memorized["sample_id"], memorized["memorized_since"], strict=True))
    for _, members in per_sample.groupby(["checkpoint", "group"]):
        group_rows(members, memorized=since, positions=list(metrics.positions), max_pairs=metrics.max_pairs,
                   seed=metrics.seed)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo/default"))
    parser.add_argument("--checkpoints", type=int, default=18)
    parser.add_argument("--per-group", type=int, default=1000)
    args = parser.parse_args()
    import ray

    from moegrok.pipeline import run_sweep
    from moegrok.pipeline.cluster import init_ray

    start = time.perf_counter()
    init_ray(ClusterConfig(num_cpus=2))
    print(f"ray start-up {time.perf_counter() - start:.1f} s (excluded below)")

    def config(run_dir: str, checkpoints: int, actors: int) -> SweepConfig:
        """The toy sweep, record and reduce only; the routing analyses are not in the plain loop."""
        return compose_config("sweep", [
            "experiment=toy", f"run_dir={run_dir}", "progress=false", "eval.enabled=false",
            f"checkpoints.dir={args.zoo}", f"checkpoints.num_evenly_spaced={checkpoints}",
            f"samples.max_per_group={args.per_group}", f"samples.shard_size={args.per_group}",
            "metrics.positions=[all]", "metrics.routing_analyses.enabled=false",
            f"record.num_actors={actors}", f"record.num_cpus={2 // actors}",  # the 2 cores, as the plain loop has
        ])

    def pipeline(checkpoints: int, actors: int) -> float:
        with tempfile.TemporaryDirectory() as run_dir:
            start = time.perf_counter()
            run_sweep(config(run_dir, checkpoints, actors), stages=["record", "reduce"])
            seconds = time.perf_counter() - start
            assert len(pd.read_parquet(Path(run_dir) / "metrics.parquet")), "no metrics"
        return seconds

    sizes = (3, args.checkpoints)
    plain_loop(config("unused", 1, 1))  # warm-up: imports, Ray worker processes
    pipeline(1, 1)
    plain = {n: plain_loop(config("unused", n, 1)) for n in sizes}
    ours = {n: pipeline(n, 1) for n in sizes}
    for n in sizes:
        print(f"{n:3d} checkpoints: plain loop {plain[n]:6.1f} s   pipeline (1 actor) {ours[n]:6.1f} s   "
              f"-> {ours[n] / plain[n]:.2f}x")
    small, large = sizes
    per_plain, per_ours = ((t[large] - t[small]) / (large - small) for t in (plain, ours))
    fixed = ours[small] - small * per_ours - (plain[small] - small * per_plain)
    print(f"per checkpoint: plain {per_plain:.2f} s, pipeline {per_ours:.2f} s -> {per_ours / per_plain:.2f}x "
          f"(target <= 1.3x); pipeline fixed cost beyond the plain loop's: {fixed:.1f} s")
    two = pipeline(large, 2)
    print(f"{large} checkpoints with 2 actors: {two:.1f} s -> {ours[large] / two:.2f}x faster than 1 actor "
          "(2-core machine: the actors share 2 cores)")
    ray.shutdown()


if __name__ == "__main__":
    main()
