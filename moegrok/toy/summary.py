"""Per-group memorization and generalization steps of a toy zoo, from its training log."""

from __future__ import annotations

import pandas as pd

MEMORIZED_TRAIN_ACC = 0.99
GENERALIZED_HELDOUT_ACC = 0.9
LOW_HELDOUT_ACC = 0.3  # held-out acc at the memorization step, at most, for a real lag


def grokking_summary(train_log: pd.DataFrame) -> pd.DataFrame:
    """One row per group: memorization step (train acc first >= 0.99), held-out acc there,
    generalization step (held-out acc first >= 0.9), final held-out acc, and whether the
    group grokked (memorized with held-out acc <= 0.3, then generalized).
    """
    rows = []
    for group, log in train_log.sort_values("step").groupby("group", sort=False):
        memorized = log[log["train_acc"] >= MEMORIZED_TRAIN_ACC]
        generalized = log[log["heldout_acc"] >= GENERALIZED_HELDOUT_ACC]
        mem_step = int(memorized["step"].iloc[0]) if len(memorized) else None
        gen_step = int(generalized["step"].iloc[0]) if len(generalized) else None
        heldout_at_mem = float(memorized["heldout_acc"].iloc[0]) if len(memorized) else None
        final = float(log["heldout_acc"].iloc[-1])
        rows.append(
            {
                "group": group,
                "memorization_step": mem_step,
                "heldout_acc_at_memorization": heldout_at_mem,
                "generalization_step": gen_step,
                "final_heldout_acc": final,
                "grokked": heldout_at_mem is not None
                and heldout_at_mem <= LOW_HELDOUT_ACC
                and final >= GENERALIZED_HELDOUT_ACC,
            }
        )
    return pd.DataFrame(rows)


def print_summary(zoo_dir) -> pd.DataFrame:
    """Print and return the grokking summary of the zoo in `zoo_dir`."""
    from pathlib import Path

    summary = grokking_summary(pd.read_parquet(Path(zoo_dir) / "train_log.parquet"))
    print(f"toy zoo {zoo_dir}: memorization -> generalization per group")
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    return summary
