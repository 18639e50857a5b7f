"""What the calibrated rules say about each group of a run, beside how often such claims were wrong.

The rules and their held-out error rates come from the study (jobs/study.py, docs/findings.md),
shipped as `calibrated_rules.csv` beside this module: per rule, its form (`detector`: the paper's
pathway distance against the other groups' mean; `training loss`: the same rule on the training
loss; `step only`: a fixed onset step), its parameters, and, measured leave one zoo out on the
study's toy zoos, the share of groups that never generalized where it fired (false-alarm rate),
the share of grokking groups it missed (miss rate), its mean |onset error| and the number of
scored groups. Those rates were measured on toy zoos: on another model they are a reference, not
a guarantee, and the step-only rule's step means nothing at another scale.

verdicts.parquet (the analyze stage of a sweep): one row per group and rule with `verdict`
("generalizing since step s" or "silent"), `alarm_step` and the rule's error rates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moegrok.analysis.contrast import with_trajectory_noise
from moegrok.analysis.detector import Rule, RuleKind, detect

RULES_CSV = Path(__file__).with_name("calibrated_rules.csv")
RULE_COLUMNS = ["name", "metric", "form", "kind", "threshold", "persistence", "false_alarm_rate", "miss_rate",
                "onset_mae", "scored_groups", "zoos", "miss_cost", "source"]
SILENT = "silent"


def calibrated_rules(path: Path = RULES_CSV) -> pd.DataFrame:
    """The shipped rules (empty without the file)."""
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=RULE_COLUMNS)


def _signal(contrast: pd.DataFrame, metric: str, form: str) -> pd.DataFrame:
    mode = {"canary": "control"}.get(form, form)
    rows = contrast[(contrast["metric"] == metric) & (contrast["mode"] == mode)]
    if metric == "loss_mean" and form == "level":
        rows = contrast[(contrast["metric"] == metric) & (contrast["mode"] == "others")]
        return rows.assign(value=rows["level"])
    return rows.assign(value=rows["z"])


def run_verdicts(contrast: pd.DataFrame, rules: pd.DataFrame) -> pd.DataFrame:
    """One row per (group, rule): its claim on this run and the rule's measured error rates."""
    if contrast.empty or rules.empty:
        return pd.DataFrame(columns=["group", "rule", *RULE_COLUMNS[1:], "verdict", "onset_step", "alarm_step"])
    if "z_samples" not in contrast:
        contrast = with_trajectory_noise(contrast)
    rows = []
    groups = sorted(contrast["group"].unique())
    for rule_row in rules.to_dict("records"):
        rule = Rule(RuleKind(rule_row["kind"]), float(rule_row["threshold"]), int(rule_row["persistence"]))
        signal = _signal(contrast, rule_row["metric"], rule_row["form"])
        for group in groups:
            series = signal[signal["group"] == group]
            found = (detect(series["step"].to_numpy(float), series["value"].to_numpy(float),
                            start_step=float(series["memorization_step"].iloc[0]), rule=rule)
                     if len(series) else None)
            fired = found is not None and found.fired
            rows.append({"group": group, "rule": rule_row["name"], **{k: rule_row[k] for k in RULE_COLUMNS[1:]},
                         "verdict": f"generalizing since step {found.onset:.0f}" if fired else SILENT,
                         "onset_step": found.onset if fired else np.nan,
                         "alarm_step": found.alarm if fired else np.nan})
    return pd.DataFrame(rows)


def verdict_lines(verdicts: pd.DataFrame) -> list[str]:
    """Plain statements per group: each rule's claim with how often such claims were wrong."""
    lines = []
    for group, rows in verdicts.groupby("group", sort=True):
        parts = [f"{row.rule}: {row.verdict} (on the study's toy zoos, held out: false alarms "
                 f"{row.false_alarm_rate:.0%} of never-generalizing groups, misses {row.miss_rate:.0%})"
                 for row in rows.itertuples(index=False)]
        lines.append(f"{group}: " + "; ".join(parts))
    return lines
