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

from moegrok.contrast import group_contrasts, model_wide_contrasts
from moegrok.embedding import consecutive_diffs
from moegrok.memorization import first_step_reaching
from moegrok.sample_series import group_series, load_sample_metrics, position_suffixes, sample_metric_specs
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
    """The contrast table of a run: columns mode, group, reference, metric, step, ... (contrast.py)."""
    samples = load_sample_metrics(run.sample_metrics)
    groups = sorted(samples["group"].unique())
    if control is not None and control not in groups:
        raise ValueError(f"analysis.control={control!r}: no such group in the samples (groups: {groups})")
    frames = []
    for metric, spec in sample_metric_specs(position_suffixes(samples)).items():
        steps, series = group_series(samples, spec)
        if len(series) < 2:
            continue
        for mode in MODES if control is not None else MODES[1:]:
            frame = group_contrasts(series, steps, memorization, metric=metric,
                                    control=control if mode == "control" else None, num_draws=num_draws, seed=seed)
            frames.append(frame.assign(mode=mode))
    checkpoints = samples[["checkpoint", "step"]].drop_duplicates().sort_values("step")
    diffs_CP = med_diffs(run, checkpoints)
    if diffs_CP is not None:
        frames.append(model_wide_contrasts(diffs_CP, checkpoints["step"].to_numpy(), memorization, metric="med",
                                           num_draws=num_draws, seed=seed).assign(mode="self"))
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)
    return table[["mode", *[c for c in table.columns if c != "mode"]]]
