"""The Ray pipeline's record + reduce vs a plain single-process loop over the same checkpoints.

    python benchmarks/sweep_overhead.py [--zoo zoo/default] [--checkpoints 6] [--per-group 200]

Plain loop: load each checkpoint, RoutingRecorder over the samples, pathway features and group
metrics in-process. Pipeline: jobs' run_monitor (record + reduce stages) with 1 and with 2
record actors on a local Ray (its start-up is excluded and reported separately).
"""

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from moegrok.checkpoints import build_catalog, load_checkpoint
from moegrok.config import (
    CheckpointsConfig,
    ClusterConfig,
    EvalConfig,
    ModelConfig,
    MonitorConfig,
    RecordConfig,
    SamplesConfig,
)
from moegrok.pathways import group_metrics, sample_features
from moegrok.routing import RoutingRecorder, router_weights
from moegrok.samples import select_samples, tokenize_samples


def plain_loop(cfg: MonitorConfig) -> float:
    start = time.perf_counter()
    refs = build_catalog(cfg.checkpoints)
    frame = select_samples(cfg.samples)
    samples = None
    for ref in refs:
        model, tokenizer = load_checkpoint(ref, cfg.model, cache_dir=cfg.checkpoints.cache_dir, device="cpu")
        samples = samples or tokenize_samples(frame, tokenizer, max_tokens=cfg.samples.max_tokens)
        table = RoutingRecorder(model).record(samples, checkpoint=ref.name, step=ref.step)
        features = sample_features(table, router_weights(model).numpy())
        for _, members in features.groupby("group"):
            group_metrics(members)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo/default"))
    parser.add_argument("--checkpoints", type=int, default=6)
    parser.add_argument("--per-group", type=int, default=200)
    args = parser.parse_args()
    import ray

    from moegrok.pipeline import run_monitor
    from moegrok.pipeline.cluster import init_ray

    start = time.perf_counter()
    init_ray(ClusterConfig(num_cpus=2))
    print(f"ray start-up {time.perf_counter() - start:.1f} s (excluded below)")

    def config(run_dir: str, actors: int) -> MonitorConfig:
        return MonitorConfig(
            run_dir=run_dir, progress=False, eval=EvalConfig(enabled=False),
            model=ModelConfig(attn_implementation="eager"),
            checkpoints=CheckpointsConfig(dir=str(args.zoo), num_evenly_spaced=args.checkpoints),
            samples=SamplesConfig(paths=[str(args.zoo / "samples.jsonl")], max_per_group=args.per_group,
                                  max_tokens=32, shard_size=args.per_group),
            record=RecordConfig(num_actors=actors, num_cpus=1),
        )

    plain = plain_loop(config("unused", 1))
    print(f"plain single-process loop: {plain:.1f} s")
    timings = {}
    for actors in (1, 2):
        with tempfile.TemporaryDirectory() as run_dir:
            start = time.perf_counter()
            run_monitor(config(run_dir, actors))
            timings[actors] = time.perf_counter() - start
            stages = pd.read_parquet(Path(run_dir) / "metrics.parquet")
            assert len(stages), "no metrics"
        print(f"pipeline, {actors} record actor(s): {timings[actors]:.1f} s -> {timings[actors] / plain:.2f}x the "
              f"plain loop (target <= 1.3x at 1 worker)")
    print(f"scaling 1 -> 2 actors: {timings[1] / timings[2]:.2f}x faster (2-core machine: the actors share 2 cores)")
    ray.shutdown()


if __name__ == "__main__":
    main()
