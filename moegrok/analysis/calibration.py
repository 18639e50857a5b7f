"""Calibrate detectors on some zoos, evaluate them on others, against trivial baselines.

Ground truth per (zoo, group): its status from held-out accuracy (moegrok/analysis/onsets.py,
never shown to a detector). In a grokking group the detector should fire, with its onset near the
accuracy onset; any alarm in a group that never generalizes or has no lag is a false alarm.

Calibration picks, per detector, the rule of its grid with the lowest mean cost over the
calibration zoos' groups: |onset error| in steps for a detected grokking group, `miss_cost` steps
for a miss and for a false alarm; ties go to the higher threshold, then the longer persistence
(the more conservative rule). The step-only baseline's one parameter, its constant onset, is the
calibration zoos' mean accuracy onset. Evaluation zoos are never used to calibrate.
"""

from __future__ import annotations

import pandas as pd

from moegrok.analysis.detector import Rule, RuleKind, detect

# the baselines every detector is compared with, and the forms of a detector's signal
STEP_MEAN = "step only: calibration mean onset (baseline)"
STEP_FIT = "step only: calibrated onset (baseline)"
STEP_LAG = "step only: calibrated lag after memorization (baseline)"
STEP_ONLY = (STEP_MEAN, STEP_FIT, STEP_LAG)
LOSS_SPIKE = "training-loss spike (baseline)"
SILENT = "always silent (baseline)"
FORMS = ("control", "others", "self")  # against the control group, the other groups' mean, or itself


def headline_form(control: str | None) -> str:
    """The pre-declared headline form: against the control group when there is one."""
    return "control" if control else "others"


def run_rule(signals: pd.DataFrame, rule: Rule) -> pd.DataFrame:
    """Detections of one rule on one detector's signals (columns zoo, group, step, value,
    start_step): one row per (zoo, group) with onset and alarm."""
    rows = []
    for (zoo, group), series in signals.groupby(["zoo", "group"], sort=True):
        found = detect(series["step"].to_numpy(), series["value"].to_numpy(),
                       start_step=float(series["start_step"].iloc[0]), rule=rule)
        rows.append({"zoo": zoo, "group": group, "onset": found.onset, "alarm": found.alarm})
    return pd.DataFrame(rows, columns=["zoo", "group", "onset", "alarm"])


def outcomes(detections: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Per (zoo, group) of `truth`: fired, onset error, delay, miss, false alarm. A group without
    a detection row (no signal) counts as silent."""
    merged = truth.merge(detections, on=["zoo", "group"], how="left")
    fired = merged["alarm"].notna()
    grokking = merged["status"] == "grokking"
    return merged.assign(
        fired=fired, onset_error=(merged["onset"] - merged["accuracy_onset"]).where(grokking & fired),
        delay=(merged["alarm"] - merged["accuracy_onset"]).where(grokking & fired),
        miss=grokking & ~fired, false_alarm=~grokking & fired)


def cost(result: pd.DataFrame, *, miss_cost: float) -> float:
    """Mean cost per group: |onset error| of a detection, `miss_cost` per miss or false alarm."""
    if result.empty:
        return float("nan")
    errors = result["onset_error"].abs().fillna(0.0)
    return float((errors + miss_cost * (result["miss"] | result["false_alarm"])).mean())


def score(result: pd.DataFrame) -> dict:
    """The evaluation numbers of a set of outcomes."""
    grokking, negative = result["status"] == "grokking", result["status"] != "grokking"
    never_zoos = result.groupby("zoo")["status"].agg(lambda s: (s != "grokking").all())
    alarm_zoos = result.groupby("zoo")["false_alarm"].any()
    return {
        "grokking_groups": int(grokking.sum()), "detected": int((grokking & result["fired"]).sum()),
        "misses": int(result["miss"].sum()),
        "onset_mae": float(result["onset_error"].abs().mean()), "onset_bias": float(result["onset_error"].mean()),
        "mean_delay": float(result["delay"].mean()),
        "negative_groups": int(negative.sum()), "false_alarms": int(result["false_alarm"].sum()),
        "never_zoos": int(never_zoos.sum()), "never_zoos_with_alarm": int((never_zoos & alarm_zoos).sum()),
    }


def calibrate(signals: pd.DataFrame, truth: pd.DataFrame, rules: list[Rule], *,
              miss_cost: float) -> tuple[Rule, pd.DataFrame]:
    """The rule of `rules` with the lowest cost on `truth`'s zoos (ties: the more conservative)."""
    if truth.empty:
        raise ValueError("calibration needs at least one zoo with a memorized group")
    rows = []
    for rule in rules:
        result = outcomes(run_rule(signals, rule), truth)
        rows.append({"rule": rule.label(), "threshold": rule.threshold, "persistence": rule.persistence,
                     "cost": cost(result, miss_cost=miss_cost), **score(result)})
    table = pd.DataFrame(rows)
    best = table.sort_values(["cost", "threshold", "persistence"], ascending=[True, False, False]).index[0]
    return rules[best], table


def constant_rule(truth: pd.DataFrame) -> Rule:
    """The step-only baseline: onset = the mean accuracy onset of the calibration grokking groups."""
    onsets = truth.loc[truth["status"] == "grokking", "accuracy_onset"]
    if onsets.empty:
        raise ValueError("the step-only baseline needs a grokking group among the calibration zoos")
    return Rule(RuleKind.constant, float(onsets.mean()))
