"""Per-sample values of a metric over checkpoints, per group: what the contrast bootstraps.

The reduce stage stores per sample and checkpoint its pathway features and loss
(sample_metrics/). A group metric of metrics.parquet is either a mean of a per-sample value
(`mean_cos`, `consistency`, `pathway_length`, `loss_mean`) or a mean over sample pairs of a
distance between their pathways (`pathway_distance*`). Here each becomes a matrix over the
checkpoints and the samples recorded at every checkpoint (sample_id order): values (C, N) for a
mean, distances (C, N, N) for a pair metric (NaN where a sample has no value at a checkpoint), so
that resampling the samples gives the metric's bootstrap distribution; with every sample once it is
the metrics.parquet value. The contrast reads one checkpoint at a time (C = 1), so its memory does
not grow with the number of checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from moegrok.store import AnyPath, ObjectPath, as_path
from moegrok.store import dataset as parquet_dataset

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


def checkpoint_dirs(directory: str | AnyPath) -> list[AnyPath]:
    """The reduce stage's per-checkpoint directories of sample_metrics/ (one Parquet file per shard)."""
    directory = as_path(directory)
    if isinstance(directory, ObjectPath):  # one listing, not one per checkpoint
        relative = [info.path[len(directory.key) + 1:] for info in directory.listing(recursive=True)]
        return sorted(directory / name.split("/")[0] for name in {
            name.rpartition("/")[0] for name in relative if name.count("/") == 1 and name.endswith(".parquet")
            and not name.rpartition("/")[2].startswith(".")})
    return sorted(path for path in directory.iterdir() if path.is_dir() and any(path.glob("*.parquet")))


def read_checkpoint(path: AnyPath, columns: list[str]) -> pd.DataFrame:
    dataset = parquet_dataset(path)
    return dataset.to_table(columns=[c for c in columns if c in dataset.schema.names]).to_pandas()


def position_suffixes(columns: list[str]) -> list[str]:
    return ["", *sorted(c[len("pathway_length"):] for c in columns if c.startswith("pathway_length_"))]


def present_samples(directory: str | Path, samples: pd.DataFrame) -> tuple[dict[str, np.ndarray], list[str]]:
    """(per group the sorted ids of the samples present at every checkpoint, the table's columns).
    `samples`: sample_id, group, shard (samples.parquet). A checkpoint holds the samples of the
    shards whose file it has (a shard's features are written whole), so nothing is read but one
    schema."""
    paths = checkpoint_dirs(directory)
    shards = set(samples["shard"])
    for path in paths:
        shards &= {int(p.stem.removeprefix("shard")) for p in path.glob("shard*.parquet")}
    everywhere = samples[samples["shard"].isin(shards)]
    columns = parquet_dataset(paths[0]).schema.names if paths else []
    return ({str(group): np.array(sorted(part["sample_id"])) for group, part in everywhere.groupby("group", sort=True)},
            columns)


def checkpoint_series(aligned: pd.DataFrame, spec: tuple[str, str, object]) -> GroupSeries:
    """One group's series of one metric at one checkpoint, from its rows indexed by the group's
    sample ids (`rows.set_index("sample_id").reindex(ids)`): values (1, N) or distances (1, N, N)."""
    kind, column, scorer = spec
    if column not in aligned:
        raise ValueError(f"sample_metrics has no column {column!r} (columns: {sorted(aligned.columns)})")
    values = aligned[column]
    if kind == "mean":
        return GroupSeries(kind, values.to_numpy(dtype=np.float64)[None, :])
    present = values.notna().to_numpy()
    distances_NN = np.full((len(values), len(values)), np.nan)  # a sample without a pathway here: NaN row and column
    strings = values[present].tolist()
    distances_NN[np.ix_(present, present)] = process.cdist(strings, strings, scorer=scorer, workers=1)
    return GroupSeries(kind, distances_NN[None])

