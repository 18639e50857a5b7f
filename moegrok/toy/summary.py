"""Per-group memorization and generalization steps of a toy zoo, from its training log.

A group's status (grokking, never, no lag) follows moegrok's one rule (moegrok/analysis/onsets.py)
on the held-out accuracy of the training log; `generalization_step` (held-out accuracy first
>= 0.9) is descriptive only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moegrok.analysis.onsets import generalization_status, onset
from moegrok.config import AnalysisConfig
from moegrok.metrics.memorization import MEMORIZED_ACCURACY, first_step_reaching

GENERALIZED_HELDOUT_ACC = 0.9


def _as_int(step: float | None) -> int | None:
    return None if step is None or not np.isfinite(step) else int(step)


def grokking_summary(train_log: pd.DataFrame, *, min_rise: float = AnalysisConfig.min_rise) -> pd.DataFrame:
    """One row per group: memorization step (train acc first >= MEMORIZED_ACCURACY), held-out acc
    there, the accuracy onset after it, the step where held-out acc first reaches 0.9, final
    held-out acc, and the group's status."""
    rows = []
    for group, log in train_log.sort_values("step").groupby("group", sort=False):
        steps, heldout = log["step"].to_numpy(float), log["heldout_acc"].to_numpy(float)
        mem_step = first_step_reaching(log["step"], log["train_acc"], MEMORIZED_ACCURACY)
        at_memorization = None if mem_step is None else float(np.interp(mem_step, steps, heldout))
        acc_onset = float("nan") if mem_step is None else onset(steps, heldout, start_step=mem_step,
                                                                min_rise=min_rise)
        rows.append({
            "group": group,
            "memorization_step": _as_int(mem_step),
            "heldout_acc_at_memorization": at_memorization,
            "generalization_onset": _as_int(acc_onset),
            "generalization_step": _as_int(first_step_reaching(log["step"], log["heldout_acc"],
                                                               GENERALIZED_HELDOUT_ACC)),
            "final_heldout_acc": float(heldout[-1]),
            "status": "never" if at_memorization is None else generalization_status(at_memorization, acc_onset),
        })
    return pd.DataFrame(rows)


def print_summary(zoo_dir: str | Path) -> pd.DataFrame:
    """Print and return the grokking summary of the zoo in `zoo_dir`."""
    summary = grokking_summary(pd.read_parquet(Path(zoo_dir) / "train_log.parquet"))
    print(f"toy zoo {zoo_dir}: memorization -> generalization per group")
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    return summary
