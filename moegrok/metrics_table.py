"""Routing tables -> per-sample features -> metrics rows, as pure functions.

The reduce stage runs these under Ray Data, the live monitor and the study in-process. Position
variants other than "all" add their feature and metric columns with the suffix `_<positions>`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from moegrok.pathways import VARIANT_COLUMNS, group_metrics, sample_features
from moegrok.progress import loss_stats

SHARED_METRICS = {"num_samples", "num_pairs", "pairs"}  # the same for every position variant


def suffix(positions: str) -> str:
    return "" if positions == "all" else f"_{positions}"


def checkpoint_features(rows: pa.Table, routers_LED: np.ndarray, *, threshold: float,
                        positions: list[str]) -> pd.DataFrame:
    """Per-sample features of one checkpoint's routing rows, every position variant side by side."""
    merged = None
    for variant in positions:
        end = suffix(variant)
        features = sample_features(rows, routers_LED, threshold=threshold, positions=variant,
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
    end = suffix(positions)
    renamed = features[["sample_id", *(c + end for c in VARIANT_COLUMNS)]].rename(
        columns={c + end: c for c in VARIANT_COLUMNS})
    metrics = group_metrics(renamed, max_pairs=max_pairs, seed=seed, per_layer=per_layer)
    return metrics if not end else {k + end: v for k, v in metrics.items() if k not in SHARED_METRICS}


def group_rows(group: pd.DataFrame, *, memorized: dict[str, float] | None, positions: list[str],
               max_pairs: int, seed: int, per_layer: bool = True) -> pd.DataFrame:
    """Metrics of one (checkpoint, group): a row for all samples and, when `memorized` (sample id
    -> memorized since step) is given, a row for the samples memorized by this checkpoint."""
    step = int(group["step"].iloc[0])
    sets = [("all", group)]
    meta = {}
    if memorized is not None:
        since = group["sample_id"].map(memorized).astype(float)
        sets.append(("memorized", group[since.le(step).to_numpy()]))
        meta["num_memorized"] = int(since.le(step).sum())
    rows = []
    for sample_set, members in sets:
        row = {"checkpoint": group["checkpoint"].iloc[0], "step": step, "group": group["group"].iloc[0],
               "sample_set": sample_set, **meta}
        for variant in positions:
            row.update(variant_metrics(members, variant, max_pairs=max_pairs, seed=seed, per_layer=per_layer))
        row.update(loss_stats(members["loss"]))
        row["train_accuracy"] = float(members["token_accuracy"].mean()) if len(members) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)
