"""Per-sample values of a metric over checkpoints, per group: what the contrast bootstraps.

The reduce stage stores per sample and checkpoint its pathway features and loss
(sample_metrics/). A group metric of metrics.parquet is either a mean of a per-sample value
(`mean_cos`, `consistency`, `pathway_length`, `loss_mean`) or a mean over sample pairs of a
distance between their pathways (`pathway_distance*`). Here each becomes a matrix over the
checkpoints and the samples present at every checkpoint (sample_id order): values (C, N) for a
mean, distances (C, N, N) for a pair metric, so that resampling the samples gives the metric's
bootstrap distribution; with every sample once it is the metrics.parquet value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

# metric -> (kind, per-sample column, pair distance)
BASE_METRICS = {
    "pathway_distance": ("pairs", "pathway", Levenshtein.distance),
    "pathway_distance_norm": ("pairs", "pathway", Levenshtein.normalized_distance),
    "pathway_distance_chars": ("pairs", "pathway_str", Levenshtein.distance),
    "pathway_length": ("mean", "pathway_length", None),
    "mean_cos": ("mean", "mean_cos", None),
    "consistency": ("mean", "consistency", None),
}
LOSS_METRIC = ("loss_mean", ("mean", "loss", None))  # the same for every positions variant


@dataclass(frozen=True)
class GroupSeries:
    kind: str  # "mean": values (C, N); "pairs": distances (C, N, N)
    values: np.ndarray

    @property
    def num_samples(self) -> int:
        return self.values.shape[1]


def sample_metric_specs(suffixes: list[str]) -> dict[str, tuple[str, str, object]]:
    """Every per-sample metric for the stored position variants ("" = all tokens, "_answer", ...)."""
    specs = {name + suffix: (kind, column + suffix, scorer) for suffix in suffixes
             for name, (kind, column, scorer) in BASE_METRICS.items()}
    specs[LOSS_METRIC[0]] = LOSS_METRIC[1]
    return specs


def load_sample_metrics(directory: str | Path) -> pd.DataFrame:
    """The reduce stage's per-sample table (every checkpoint's shards), without the per-layer lists."""
    dataset = ds.dataset(str(directory), format="parquet")
    columns = [name for name in dataset.schema.names if not name.startswith("layer_pathways")]
    return dataset.to_table(columns=columns).to_pandas()


def position_suffixes(samples: pd.DataFrame) -> list[str]:
    return ["", *sorted(c[len("pathway_length"):] for c in samples.columns
                        if c.startswith("pathway_length_"))]


def group_series(samples: pd.DataFrame, spec: tuple[str, str, object]) -> tuple[np.ndarray, dict[str, GroupSeries]]:
    """(steps, per group its series) of one metric; samples missing at any checkpoint are left out."""
    kind, column, scorer = spec
    if column not in samples:
        raise ValueError(f"sample_metrics has no column {column!r} (columns: {sorted(samples.columns)})")
    steps = np.sort(samples["step"].unique())
    out = {}
    for group, rows in samples.groupby("group", sort=True):
        table = rows.pivot_table(index="sample_id", columns="step", values=column, aggfunc="first")
        table = table.reindex(columns=steps).dropna(axis=0, how="any").sort_index()
        if len(table) < 2:
            continue
        if kind == "mean":
            out[group] = GroupSeries(kind, table.to_numpy(dtype=np.float64).T)
        else:
            out[group] = GroupSeries(kind, np.stack([
                process.cdist(table[step].tolist(), table[step].tolist(), scorer=scorer, workers=1).astype(np.float64)
                for step in steps]))
    return steps, out
