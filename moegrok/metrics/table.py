"""Routing tables -> per-sample features -> metrics rows, as pure functions.

The reduce stage runs these on Ray workers, live metrics and the study in-process. Position
variants other than "all" add their feature and metric columns with the suffix `_<positions>`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from moegrok.metrics.pathways import VARIANT_COLUMNS, group_metrics, positions_suffix, sample_features

SHARED_METRICS = {"num_samples", "num_pairs", "pairs"}  # the same for every position variant


def loss_stats(losses: pd.Series) -> dict[str, float]:
    """Summary of a group's per-sample losses at one checkpoint."""
    values = losses.to_numpy(dtype=np.float64)
    values = values[np.isfinite(values)]  # one sample without a loss never makes its group's NaN
    if len(values) == 0:
        return dict.fromkeys(("loss_mean", "loss_median", "loss_std", "loss_p90"), float("nan"))
    return {
        "loss_mean": float(values.mean()),
        "loss_median": float(np.median(values)),
        "loss_std": float(values.std()),
        "loss_p90": float(np.quantile(values, 0.9)),
    }


def checkpoint_features(rows: pa.Table, routers_LED: np.ndarray, *, weight_share: float,
                        positions: list[str]) -> pd.DataFrame:
    """Per-sample features of one checkpoint's routing rows, every position variant side by side."""
    merged = None
    for variant in positions:
        end = positions_suffix(variant)
        features = sample_features(rows, routers_LED, weight_share=weight_share, positions=variant,
                                   shape=routers_LED.shape[:2])
        features = features.rename(columns={c: c + end for c in VARIANT_COLUMNS})
        if merged is None:
            merged = features
        else:
            merged = merged.merge(features[["sample_id", *(c + end for c in VARIANT_COLUMNS)]], on="sample_id",
                                  validate="one_to_one")
    return merged


def variant_metrics(features: pd.DataFrame, positions: str, *, max_pairs: int, seed: int,
                    per_layer: bool = True) -> dict:
    end = positions_suffix(positions)
    renamed = features[["sample_id", *(c + end for c in VARIANT_COLUMNS)]].rename(
        columns={c + end: c for c in VARIANT_COLUMNS})
    metrics = group_metrics(renamed, max_pairs=max_pairs, seed=seed, per_layer=per_layer)
    return metrics if not end else {k + end: v for k, v in metrics.items() if k not in SHARED_METRICS}


def set_row(members: pd.DataFrame, *, checkpoint: str, step: int, group: str, sample_set: str,
            positions: list[str], max_pairs: int, seed: int, per_layer: bool = True,
            num_memorized: int | None = None) -> dict:
    """The metrics row of one (checkpoint, group, sample set) from its members' features."""
    row = {"checkpoint": checkpoint, "step": step, "group": group, "sample_set": sample_set}
    if num_memorized is not None:
        row["num_memorized"] = num_memorized
    for variant in positions:
        row.update(variant_metrics(members, variant, max_pairs=max_pairs, seed=seed, per_layer=per_layer))
    row.update(loss_stats(members["loss"]))
    row["train_accuracy"] = float(members["token_accuracy"].mean()) if len(members) else float("nan")
    return row


def memorized_by(group: pd.DataFrame, memorized: dict[str, float], step: int) -> np.ndarray:
    """Mask of the rows whose sample is memorized by `step` (sample id -> memorized since)."""
    return group["sample_id"].map(memorized).astype(float).le(step).to_numpy()


def group_rows(group: pd.DataFrame, *, memorized: dict[str, float] | None, positions: list[str],
               max_pairs: int, seed: int, per_layer: bool = True) -> pd.DataFrame:
    """Metrics of one (checkpoint, group): a row for all samples and, when `memorized` (sample id
    -> memorized since step) is given, a row for the samples memorized by this checkpoint."""
    step = int(group["step"].iloc[0])
    key = {"checkpoint": group["checkpoint"].iloc[0], "step": step, "group": group["group"].iloc[0]}
    sets, num_memorized = [("all", group)], None
    if memorized is not None:
        mask = memorized_by(group, memorized, step)
        sets.append(("memorized", group[mask]))
        num_memorized = int(mask.sum())
    return pd.DataFrame([set_row(members, **key, sample_set=sample_set, positions=positions, max_pairs=max_pairs,
                                 seed=seed, per_layer=per_layer, num_memorized=num_memorized)
                         for sample_set, members in sets])
