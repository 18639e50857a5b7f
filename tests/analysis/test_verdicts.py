import numpy as np
import pandas as pd

from moegrok.analysis.verdicts import RULE_COLUMNS, calibrated_rules, run_verdicts, verdict_lines

STEPS = np.arange(100, 950, 50)


def run_contrast() -> pd.DataFrame:
    """One run: in `add` the distance falls (its declared way) from step 500 on; `mul` only jitters."""
    rng = np.random.default_rng(0)
    rows = []
    for group, onset in (("add", 500), ("mul", None)):
        drop = np.where((onset or 10_000) < STEPS, -30.0, 0.0)
        for metric, sign in (("pathway_distance", -1), ("loss_mean", -1)):
            did = drop + rng.normal(0, 1, len(STEPS)) if metric == "pathway_distance" else rng.normal(0, 1, len(STEPS))
            rows += [{"mode": "others", "group": group, "metric": metric, "step": int(s), "memorization_step": 100.0,
                      "direction": sign, "level": 1.0, "did": did[i] - did[0], "se": 1.0, "z": np.nan,
                      "change": did[i] - did[0], "self_se": 1.0, "self_z": np.nan} for i, s in enumerate(STEPS)]
    return pd.DataFrame(rows)


def rules() -> pd.DataFrame:
    base = {"false_alarm_rate": 0.25, "miss_rate": 0.5, "onset_mae": 80.0, "scored_groups": 12, "zoos": 5,
            "miss_cost": 300.0, "source": "test"}
    return pd.DataFrame([
        {"name": "detector", "metric": "pathway_distance", "form": "others", "kind": "threshold", "threshold": 2.0,
         "persistence": 2, **base},
        {"name": "training loss", "metric": "loss_mean", "form": "others", "kind": "threshold", "threshold": 2.0,
         "persistence": 2, **base},
        {"name": "step only", "metric": "loss_mean", "form": "others", "kind": "constant", "threshold": 600.0,
         "persistence": 1, **base}])[RULE_COLUMNS]


def test_each_group_gets_each_rules_claim_and_its_error_rates():
    verdicts = run_verdicts(run_contrast(), rules()).set_index(["group", "rule"])
    assert verdicts.loc[("add", "detector"), "verdict"] == "generalizing since step 500"
    assert verdicts.loc[("mul", "detector"), "verdict"] == "silent"
    assert verdicts.loc[("add", "training loss"), "verdict"] == "silent"
    assert verdicts.loc[("mul", "step only"), "verdict"] == "generalizing since step 600"  # wherever training goes
    assert (verdicts["false_alarm_rate"] == 0.25).all()
    lines = verdict_lines(verdicts.reset_index())
    assert len(lines) == 2 and "false alarms 25% of never-generalizing groups, misses 50%" in lines[0]


def test_without_rules_or_contrast_there_is_no_claim(tmp_path):
    assert calibrated_rules(tmp_path / "none.csv").empty
    assert run_verdicts(run_contrast(), calibrated_rules(tmp_path / "none.csv")).empty
    assert run_verdicts(pd.DataFrame(), rules()).empty
