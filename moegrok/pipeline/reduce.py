"""Reduce stage: routing tables -> memorized.parquet, sample_metrics.parquet, metrics.parquet.

Ray Data reads the recorded shards, maps them to per-sample pathway features (pathways.py)
and groups them by (checkpoint, group) into the pathway metrics, for the memorized samples and
for all samples. Positions variants other than "all" get their metric columns suffixed.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
from safetensors.numpy import load_file

from moegrok.checkpoints import CheckpointRef
from moegrok.config import MonitorConfig
from moegrok.pathways import VARIANT_COLUMNS, group_metrics, sample_features
from moegrok.progress import loss_stats, main_embedding_diff
from moegrok.samples import select_memorized
from moegrok.store import RunDir, done_marker, write_parquet

KEYS = ["checkpoint", "step", "group", "sample_set"]


@functools.lru_cache(maxsize=8)
def _checkpoint_weights(path: str) -> dict[str, np.ndarray]:
    return load_file(path)


def _features_batch(batch: pa.Table, *, run_root: str, threshold: float, positions: list[str]) -> pd.DataFrame:
    """Per-sample features of a batch of routing rows (any mix of checkpoints)."""
    run = RunDir(run_root)
    parts = []
    for checkpoint in sorted(set(batch["checkpoint"].to_pylist())):
        rows = batch.filter(pa.compute.equal(batch["checkpoint"], checkpoint))
        routers_LED = _checkpoint_weights(str(run.checkpoint_weights(checkpoint)))["routers"]
        shape = routers_LED.shape[:2]
        merged = None
        for variant in positions:
            suffix = _suffix(variant)
            features = sample_features(rows, routers_LED, threshold=threshold, positions=variant, shape=shape)
            features = features.rename(columns={c: c + suffix for c in VARIANT_COLUMNS})
            if merged is None:
                merged = features
            else:
                merged = merged.merge(features[["sample_id", *(c + suffix for c in VARIANT_COLUMNS)]],
                                      on="sample_id", validate="one_to_one")
        parts.append(merged)
    return pd.concat(parts, ignore_index=True)


def _suffix(positions: str) -> str:
    return "" if positions == "all" else f"_{positions}"


def _variant_metrics(features: pd.DataFrame, suffix: str, *, max_pairs: int, seed: int) -> dict:
    renamed = features[["sample_id", *(c + suffix for c in VARIANT_COLUMNS)]].rename(
        columns={c + suffix: c for c in VARIANT_COLUMNS})
    metrics = group_metrics(renamed, max_pairs=max_pairs, seed=seed)
    if not suffix:
        return metrics
    shared = {"num_samples", "num_pairs", "pairs"}
    return {k + suffix: v for k, v in metrics.items() if k not in shared}


def _group_batch(group: pd.DataFrame, *, memorized: dict[str, float], positions: list[str], max_pairs: int,
                 seed: int) -> pd.DataFrame:
    """Metrics of one (checkpoint, group) for all samples and for the memorized ones."""
    step = int(group["step"].iloc[0])
    since = group["sample_id"].map(memorized).astype(float)
    rows = []
    for sample_set, members in (("all", group), ("memorized", group[since.le(step).to_numpy()])):
        row = {"checkpoint": group["checkpoint"].iloc[0], "step": step, "group": group["group"].iloc[0],
               "sample_set": sample_set, "num_memorized": int(since.le(step).sum())}
        for variant in positions:
            row.update(_variant_metrics(members, _suffix(variant), max_pairs=max_pairs, seed=seed))
        row.update(loss_stats(members["loss"]))
        rows.append(row)
    return pd.DataFrame(rows)


def unit_files(run: RunDir, refs: list[CheckpointRef], num_shards: int) -> list[str]:
    """Routing files of this sweep's completed units only (stale files are never read)."""
    paths = [run.routing_shard(ref.name, index) for ref in refs for index in range(num_shards)]
    return [str(p) for p in paths if p.exists() and done_marker(p).exists()]


def reduce_stage(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef], num_shards: int) -> dict:
    start = time.perf_counter()
    files = unit_files(run, refs, num_shards)
    if not files:
        raise RuntimeError(f"no recorded routing in {run.root / 'routing'}: run the record stage first")
    metrics_cfg = cfg.metrics
    losses = ray.data.read_parquet(files, columns=["checkpoint", "step", "sample_id", "group", "loss"]).to_pandas()
    memo = metrics_cfg.memorization
    memorized = select_memorized(losses, delta=memo.delta, eps=memo.eps, target_fraction=memo.target_fraction)
    write_parquet(memorized, run.memorized)

    features = ray.data.read_parquet(files).map_batches(
        _features_batch, batch_format="pyarrow", batch_size=1024,
        fn_kwargs={"run_root": str(run.root), "threshold": metrics_cfg.threshold,
                   "positions": list(metrics_cfg.positions)},
    ).materialize()
    if metrics_cfg.write_sample_metrics:
        per_sample = features.to_pandas().sort_values(["step", "checkpoint", "group", "sample_id"])
        write_parquet(per_sample.drop(columns=[c for c in per_sample if c.startswith("layer_pathways")]),
                      run.sample_metrics)
    since = dict(zip(memorized["sample_id"], memorized["memorized_since"], strict=True))
    num_keys = len(refs) * len(features.unique("group"))
    num_partitions = max(1, min(num_keys, int(ray.cluster_resources().get("CPU", 1))))
    metrics = features.groupby(["checkpoint", "group"], num_partitions=num_partitions).map_groups(
        _group_batch, batch_format="pandas",
        fn_kwargs={"memorized": since, "positions": list(metrics_cfg.positions),
                   "max_pairs": metrics_cfg.max_pairs, "seed": metrics_cfg.seed},
    ).to_pandas()
    metrics["med"] = metrics["checkpoint"].map(_med_by_checkpoint(run, refs))
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
