"""When a sample or a data group counts as memorized: every rule lives here.

* Sample, the paper's loss rule (arXiv 2506.21551, section 3.1): sample i is memorized since
  t*_i if at every checkpoint t >= t*_i its loss is <= eps and within delta of its loss at the
  last checkpoint T. It needs the last checkpoint, so it is retrospective. eps is fixed or the
  smallest multiple of 0.1 that memorizes a target fraction of the group before T.
* Group, by train accuracy: the first checkpoint where the group's greedy token accuracy on its
  training samples reaches `AnalysisConfig.memorized_accuracy` (0.99); for text pretraining,
  where it never does, the median t*_i of the group's loss-rule-memorized samples (retrospective).
* Group, causally (the contrast's start t0): the train-accuracy step, else the first checkpoint.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moegrok.config import AnalysisConfig

MEMORIZED_ACCURACY = AnalysisConfig.memorized_accuracy


def first_step_reaching(steps: pd.Series, values: pd.Series, threshold: float) -> float | None:
    """The first step (in step order) whose value is >= threshold; None if none is."""
    order = np.argsort(steps.to_numpy(), kind="stable")
    reached = values.to_numpy()[order] >= threshold
    return float(steps.to_numpy()[order][reached.argmax()]) if reached.any() else None


def memorized_since(losses: pd.DataFrame, *, eps: float, delta: float) -> pd.Series:
    """Step t*_i since which sample i is memorized by the loss rule, NaN if never.

    `losses`: columns step, sample_id, loss. Sample i is memorized since t* when for every
    checkpoint t >= t*: loss_t <= eps and |loss_t - loss_T| <= delta (T = last checkpoint).
    """
    loss_NC = losses.pivot_table(index="sample_id", columns="step", values="loss", aggfunc="first")
    loss_NC = loss_NC.sort_index(axis=1)
    steps = loss_NC.columns.to_numpy()
    values = loss_NC.to_numpy()
    ok_NC = (values <= eps) & (np.abs(values - values[:, -1:]) <= delta)
    # suffix-all: ok from column s to the end
    suffix_ok_NC = np.flip(np.logical_and.accumulate(np.flip(ok_NC, axis=1), axis=1), axis=1)
    first = np.where(suffix_ok_NC.any(axis=1), suffix_ok_NC.argmax(axis=1), -1)
    since = np.where(first >= 0, steps[np.maximum(first, 0)], np.nan)
    return pd.Series(since, index=loss_NC.index, name="memorized_since")


def select_memorized(
    losses: pd.DataFrame,
    *,
    delta: float = 0.05,
    eps: float | None = None,
    target_fraction: float = 0.2,
    eps_grid_step: float = 0.1,
    max_eps: float = 10.0,
) -> pd.DataFrame:
    """Per group, eps fixed or the smallest multiple of `eps_grid_step` whose share of samples
    memorized before the last checkpoint reaches `target_fraction` (the paper aims at 20-25%).

    `losses`: columns step, sample_id, group, loss. Returns sample_id, group, eps,
    memorized_since (NaN = never memorized before the last checkpoint).
    """
    last_step = losses["step"].max()
    parts = []
    for group, part in losses.groupby("group", sort=True):
        num_grid = round(max_eps / eps_grid_step)
        grid = [eps] if eps is not None else [round(k * eps_grid_step, 10) for k in range(1, num_grid + 1)]
        for candidate in grid:
            since = memorized_since(part, eps=float(candidate), delta=delta)
            since = since.where(since < last_step)
            if since.notna().mean() >= target_fraction:
                break
        parts.append(
            pd.DataFrame(
                {"sample_id": since.index, "group": group, "eps": float(candidate),
                 "memorized_since": since.to_numpy()}
            )
        )
    return pd.concat(parts, ignore_index=True)


def memorization_steps(metrics: pd.DataFrame, memorized: pd.DataFrame, *,
                       memorized_accuracy: float = MEMORIZED_ACCURACY) -> dict[str, tuple[float, str]]:
    """Per group: (step, rule) -- the first checkpoint whose train accuracy over all samples is
    >= memorized_accuracy, else the median step since which its loss-rule-memorized samples are."""
    loss_rule = memorized.dropna(subset=["memorized_since"]).groupby("group")["memorized_since"].median()
    everything = metrics[metrics["sample_set"] == "all"]
    out = {}
    for group, rows in everything.groupby("group"):
        step = (first_step_reaching(rows["step"], rows["train_accuracy"], memorized_accuracy)
                if "train_accuracy" in rows else None)
        if step is not None:
            out[group] = (step, "train_accuracy")
        elif group in loss_rule:
            out[group] = (float(loss_rule[group]), "loss_rule")
    return out


def causal_memorization(metrics: pd.DataFrame, *, memorized_accuracy: float) -> dict[str, tuple[float, str]]:
    """Per group, (step, rule) of the contrast's start t0: the first checkpoint whose train accuracy
    (all samples) is >= memorized_accuracy ("train_accuracy"), else the first checkpoint
    ("first_checkpoint": the loss rule's step would need the last checkpoint)."""
    everything = metrics[metrics["sample_set"] == "all"]
    first = float(everything["step"].min())
    out = {}
    for group, rows in everything.groupby("group"):
        step = (first_step_reaching(rows["step"], rows["train_accuracy"], memorized_accuracy)
                if "train_accuracy" in rows else None)
        out[group] = (first, "first_checkpoint") if step is None else (step, "train_accuracy")
    return out
