"""contrast.parquet of a run directory: every per-sample metric's contrast, plus the model-wide MED.

Modes: "control" (each group against `analysis.control`, the control against the others' mean),
only when a control is configured, and "others" (each group against the other groups' mean).
Always on all recorded training samples: the memorized set is retrospective, and a paired
bootstrap needs the same samples at every checkpoint.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

from moegrok.contrast import group_weights, model_wide_contrasts, statistic, statistic_contrasts
from moegrok.embedding import consecutive_diffs
from moegrok.memorization import first_step_reaching
from moegrok.sample_series import (
    checkpoint_dirs,
    checkpoint_series,
    position_suffixes,
    present_samples,
    read_checkpoint,
    sample_metric_specs,
)
from moegrok.store import RunDir

MODES = ("control", "others")


def causal_memorization(metrics: pd.DataFrame, *, memorized_accuracy: float) -> dict[str, float]:
    """Per group, the contrast's start t0: the first checkpoint whose train accuracy (all samples) is
    >= memorized_accuracy, else the first checkpoint (the loss rule's step needs the last one)."""
    everything = metrics[metrics["sample_set"] == "all"]
    first = float(everything["step"].min())
    out = {}
    for group, rows in everything.groupby("group"):
        step = (first_step_reaching(rows["step"], rows["train_accuracy"], memorized_accuracy)
                if "train_accuracy" in rows else None)
        out[group] = first if step is None else step
    return out


def med_diffs(run: RunDir, checkpoints: pd.DataFrame) -> np.ndarray | None:
    """(checkpoints, p-1) consecutive residue-embedding differences, None without residue embeddings."""
    rows = []
    for name in checkpoints["checkpoint"]:
        path = run.checkpoint_weights(name)
        weights = load_file(path) if path.exists() else {}
        if "residue_embeddings" not in weights:
            return None
        rows.append(consecutive_diffs(weights["residue_embeddings"]))
    return np.stack(rows)


def run_contrasts(run: RunDir, memorization: dict[str, float], *, control: str | None, num_draws: int,
                  seed: int = 0) -> pd.DataFrame:
    """The contrast table of a run: columns mode, group, reference, metric, step, ... (contrast.py).
    Reads sample_metrics/ one checkpoint at a time and keeps only each metric's statistic under
    every draw, so memory does not grow with the per-sample rows of all checkpoints."""
    ids, columns = present_samples(run.sample_metrics)
    ids = {group: members for group, members in ids.items() if len(members) >= 2}
    if control is not None and control not in ids:
        raise ValueError(f"analysis.control={control!r}: no such group in the samples (groups: {sorted(ids)})")
    if len(ids) < 2:
        return pd.DataFrame()
    specs = {metric: spec for metric, spec in sample_metric_specs(position_suffixes(columns)).items()
             if spec[1] in columns}  # what the reduce stored
    weights = group_weights({group: len(members) for group, members in ids.items()}, num_draws=num_draws, seed=seed)
    stats: dict[str, dict[str, list[np.ndarray]]] = {metric: {group: [] for group in ids} for metric in specs}
    checkpoints = []
    for path in checkpoint_dirs(run.sample_metrics):  # in step order below
        rows = read_checkpoint(path, ["checkpoint", "step", "group", "sample_id", *{s[1] for s in specs.values()}])
        checkpoints.append((int(rows["step"].iloc[0]), rows["checkpoint"].iloc[0]))
        for group, members in rows.groupby("group"):
            if group in ids:
                aligned = members.set_index("sample_id").reindex(ids[group])
                for metric, spec in specs.items():
                    stats[metric][group].append(statistic(checkpoint_series(aligned, spec), weights[group]))
    by_step = pd.DataFrame(checkpoints, columns=["step", "checkpoint"]).sort_values("step", kind="stable")
    order, steps = by_step.index.to_numpy(), by_step["step"].to_numpy()
    frames = []
    for metric, per_group in stats.items():
        stats_BC = {group: np.concatenate(columns_B1, axis=1)[:, order] for group, columns_B1 in per_group.items()}
        for mode in MODES if control is not None else MODES[1:]:
            frame = statistic_contrasts(stats_BC, steps, memorization, metric=metric,
                                        control=control if mode == "control" else None)
            frames.append(frame.assign(mode=mode))
    diffs_CP = med_diffs(run, by_step)
    if diffs_CP is not None:
        frames.append(model_wide_contrasts(diffs_CP, steps, memorization, metric="med",
                                           num_draws=num_draws, seed=seed).assign(mode="self"))
    table = pd.concat(frames, ignore_index=True)
    return table[["mode", *[c for c in table.columns if c != "mode"]]]
