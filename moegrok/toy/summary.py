"""Per-group memorization and generalization steps of a toy zoo, from its training log."""

from __future__ import annotations

import pandas as pd

from moegrok.memorization import MEMORIZED_ACCURACY, first_step_reaching

GENERALIZED_HELDOUT_ACC = 0.9
LOW_HELDOUT_ACC = 0.3  # held-out acc at the memorization step, at most, for a real lag


def _as_int(step: float | None) -> int | None:
    return None if step is None else int(step)


def grokking_summary(train_log: pd.DataFrame) -> pd.DataFrame:
    """One row per group: memorization step (train acc first >= MEMORIZED_ACCURACY), held-out acc
    there, generalization step (held-out acc first >= 0.9), final held-out acc, and whether the
    group grokked (memorized with held-out acc <= 0.3, then generalized).
    """
    rows = []
    for group, log in train_log.sort_values("step").groupby("group", sort=False):
        mem_step = _as_int(first_step_reaching(log["step"], log["train_acc"], MEMORIZED_ACCURACY))
        gen_step = _as_int(first_step_reaching(log["step"], log["heldout_acc"], GENERALIZED_HELDOUT_ACC))
        heldout_at_mem = None if mem_step is None else float(log.loc[log["step"] == mem_step, "heldout_acc"].iloc[0])
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
