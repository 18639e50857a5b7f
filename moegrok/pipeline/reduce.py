"""Reduce stage: routing tables -> memorized.parquet, sample_metrics.parquet, metrics.parquet.

Ray Data reads the recorded shards, maps them to per-sample pathway features (pathways.py)
and reduces each (checkpoint, group) to the pathway metrics, for the memorized samples and
for all samples. Positions variants other than "all" get their metric columns suffixed.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
from safetensors.numpy import load_file

from moegrok.checkpoints import CheckpointRef
from moegrok.config import MonitorConfig
from moegrok.metrics_table import checkpoint_features, group_rows
from moegrok.pipeline.routing_stats import routing_analyses
from moegrok.progress import main_embedding_diff
from moegrok.samples import select_memorized
from moegrok.store import RunDir, done_marker, write_parquet


@functools.lru_cache(maxsize=8)
def _checkpoint_weights(path: str) -> dict[str, np.ndarray]:
    return load_file(path)


def _features_batch(batch: pa.Table, *, run_root: str, threshold: float, positions: list[str]) -> pd.DataFrame:
    """Per-sample features of a batch of routing rows (any mix of checkpoints)."""
    run = RunDir(run_root)
    return pd.concat([
        checkpoint_features(batch.filter(pa.compute.equal(batch["checkpoint"], checkpoint)),
                            _checkpoint_weights(str(run.checkpoint_weights(checkpoint)))["routers"],
                            threshold=threshold, positions=positions)
        for checkpoint in sorted(set(batch["checkpoint"].to_pylist()))
    ], ignore_index=True)


def _group_metrics_batch(batch: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """Metrics of each (checkpoint, group) in a batch; a batch holds whole groups."""
    return pd.concat([group_rows(members, **kwargs) for _, members in batch.groupby(["checkpoint", "group"])],
                     ignore_index=True)


def unit_files(run: RunDir, refs: list[CheckpointRef], num_shards: int) -> dict[tuple[str, int], Path]:
    """Routing files of this sweep's completed units only (stale files are never read)."""
    paths = {(ref.name, index): run.routing_shard(ref.name, index) for ref in refs for index in range(num_shards)}
    return {key: p for key, p in paths.items() if p.exists() and done_marker(p).exists()}


def reduce_stage(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef], num_shards: int) -> dict:
    start = time.perf_counter()
    units = unit_files(run, refs, num_shards)
    files = [str(p) for p in units.values()]
    if not files:
        raise RuntimeError(f"no recorded routing in {run.root / 'routing'}: run the record stage first")
    metrics_cfg = cfg.metrics
    per_sample = ray.data.read_parquet(files).map_batches(
        _features_batch, batch_format="pyarrow", batch_size=None,
        fn_kwargs={"run_root": str(run.root), "threshold": metrics_cfg.threshold,
                   "positions": list(metrics_cfg.positions)},
    ).to_pandas().sort_values(["step", "checkpoint", "group", "sample_id"], ignore_index=True)
    memo = metrics_cfg.memorization
    memorized = select_memorized(per_sample[["step", "sample_id", "group", "loss"]], delta=memo.delta,
                                 eps=memo.eps, target_fraction=memo.target_fraction)
    write_parquet(memorized, run.memorized)
    if metrics_cfg.write_sample_metrics:
        write_parquet(per_sample.drop(columns=[c for c in per_sample if c.startswith("layer_pathways")]),
                      run.sample_metrics)
    since = dict(zip(memorized["sample_id"], memorized["memorized_since"], strict=True))
    # the driver holds every sample's features already: one block per (checkpoint, group), no shuffle
    partitions = [members for _, members in per_sample.groupby(["checkpoint", "group"], sort=False)]
    metrics = ray.data.from_pandas(partitions).map_batches(
        _group_metrics_batch, batch_format="pandas", batch_size=None,
        fn_kwargs={"memorized": since, "positions": list(metrics_cfg.positions),
                   "max_pairs": metrics_cfg.max_pairs, "seed": metrics_cfg.seed},
    ).to_pandas()
    metrics["med"] = metrics["checkpoint"].map(_med_by_checkpoint(run, refs))
    if metrics_cfg.routing_analyses:
        metrics = metrics.merge(routing_analyses(cfg, run, refs, units), on=["checkpoint", "group"], how="left")
    metrics = metrics.sort_values(["step", "checkpoint", "group", "sample_set"], ignore_index=True)
    write_parquet(metrics, run.metrics)
    return {"units": len(files), "done": len(files), "skipped": 0, "failed": 0, "failures": [],
            "seconds": time.perf_counter() - start}


def _med_by_checkpoint(run: RunDir, refs: list[CheckpointRef]) -> dict[str, float]:
    out = {}
    for ref in refs:
        path = run.checkpoint_weights(ref.name)
        if path.exists():
            weights = _checkpoint_weights(str(path))
            out[ref.name] = (main_embedding_diff(weights["residue_embeddings"])
                             if "residue_embeddings" in weights else float("nan"))
    return out
