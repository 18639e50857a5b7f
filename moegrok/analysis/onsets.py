"""When a group generalizes, from held-out accuracy: the accuracy onset and the group's status.
The one definition of "grokking" in moegrok; the toy summary, the analysis and the study use it.

* Accuracy onset: take the curve's level at the first checkpoint at/after the memorization step as
  the baseline; the onset is the last checkpoint before the curve rises by at least `min_rise`
  above the baseline and stays there at every later checkpoint. It is the ground truth the
  detector (moegrok/analysis/detector.py) is judged against, and retrospective by construction.
  Metrics get no onset here: a metric's onset is what the causal detector declares.
* Status: `no_lag` when accuracy at memorization is above `LOW_ACCURACY` (0.3: it generalized at
  once), else `grokking` when it has an onset, else `never`.
* Half-rise step: the first checkpoint where accuracy is halfway from its post-memorization
  baseline to its maximum; groups are asynchronous when these differ.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LOW_ACCURACY = 0.3  # held-out accuracy at memorization, at most, for a real lag
STATUSES = ("grokking", "never", "no_lag")


def onset(steps: np.ndarray, values: np.ndarray, *, start_step: float, min_rise: float) -> float:
    """The sustained-rise onset of an oriented curve (NaN if it never rises that way). It looks at
    every later checkpoint ("stays there"): a ground truth, never a monitor."""
    order = np.argsort(steps)
    steps, values = steps[order], values[order]
    keep = (steps >= start_step) & np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if len(values) < 2:
        return float("nan")
    above = values >= values[0] + min_rise
    sustained = np.flip(np.logical_and.accumulate(np.flip(above)))  # above here and at every later point
    if not sustained.any():
        return float("nan")
    first = int(np.argmax(sustained))
    return float(steps[max(first - 1, 0)])


def generalization_status(accuracy_at_memorization: float, accuracy_onset: float, *,
                          low_accuracy: float = LOW_ACCURACY) -> str:
    """grokking, never or no_lag (the module docstring's rule)."""
    if accuracy_at_memorization > low_accuracy:
        return "no_lag"
    return "grokking" if np.isfinite(accuracy_onset) else "never"


def ground_truth(onsets: pd.DataFrame, *, low_accuracy: float = LOW_ACCURACY) -> pd.Series:
    """The status of each onsets row (columns generalization_onset, accuracy_at_memorization)."""
    statuses = [generalization_status(at_memorization, acc_onset, low_accuracy=low_accuracy)
                for at_memorization, acc_onset in zip(onsets["accuracy_at_memorization"],
                                                      onsets["generalization_onset"], strict=True)]
    return pd.Series(statuses, index=onsets.index, name="status", dtype=object)


def accuracy_onsets(joined: pd.DataFrame, mem_steps: dict[str, tuple[float, str]], *,
                    min_rise: float) -> pd.DataFrame:
    """One row per (group, benchmark): memorization step and rule, accuracy onset, lag, half-rise
    step, accuracy at memorization and at the end."""
    rows = []
    for (group, benchmark), curve in joined.groupby(["group", "benchmark"], sort=True):
        curve = curve.sort_values("step")
        mem_step, mem_rule = mem_steps.get(group, (float(curve["step"].min()), "first_checkpoint"))
        acc_onset = onset(curve["step"].to_numpy(float), curve["accuracy"].to_numpy(float), start_step=mem_step,
                          min_rise=min_rise)
        after = curve[curve["step"] >= mem_step]
        half_step = float("nan")
        if np.isfinite(acc_onset) and len(after):
            halfway = after["accuracy"].iloc[0] + 0.5 * (after["accuracy"].max() - after["accuracy"].iloc[0])
            half_step = float(after.loc[after["accuracy"] >= halfway, "step"].iloc[0])
        rows.append({"group": group, "benchmark": benchmark, "memorization_step": mem_step,
                     "memorization_rule": mem_rule, "generalization_onset": acc_onset,
                     "lag_steps": acc_onset - mem_step, "half_rise_step": half_step,
                     "accuracy_at_memorization": float(np.interp(mem_step, curve["step"], curve["accuracy"])),
                     "final_accuracy": float(curve["accuracy"].iloc[-1]),
                     "max_accuracy": float(curve["accuracy"].max())})
    return pd.DataFrame(rows)
