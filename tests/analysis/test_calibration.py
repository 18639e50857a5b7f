import numpy as np
import pandas as pd
import pytest

from moegrok.analysis.calibration import (
    calibrate,
    constant_rule,
    cost,
    outcomes,
    run_rule,
    score,
)
from moegrok.analysis.detector import Rule, RuleKind, threshold_grid
from moegrok.analysis.onsets import ground_truth

STEPS = np.arange(0, 950, 50, dtype=float)
GRID = threshold_grid([1.0, 2.0, 4.0, 8.0, 16.0], [1, 2, 3])


def synthetic_zoos(zoos: dict[str, dict[str, float | None]], signal, *, seed: int = 0):
    """(signals, truth) for zoos {zoo: {group: accuracy onset or None}}; every group memorizes at
    step 100; `signal(onset, rng)` -> the group's series over STEPS."""
    rng = np.random.default_rng(seed)
    signals, truth = [], []
    for zoo, groups in zoos.items():
        for group, accuracy_onset in groups.items():
            signals.append(pd.DataFrame({"zoo": zoo, "group": group, "step": STEPS,
                                         "value": signal(accuracy_onset, rng), "start_step": 100.0}))
            truth.append({"zoo": zoo, "group": group, "role": "calibration" if zoo.startswith("cal") else "evaluation",
                          "status": "grokking" if accuracy_onset is not None else "never",
                          "accuracy_onset": np.nan if accuracy_onset is None else accuracy_onset,
                          "collapse": False})
    return pd.concat(signals, ignore_index=True), pd.DataFrame(truth)


def tracker(onset, rng):
    """A signal that rises where accuracy rises (plus noise), flat where it never does."""
    rise = 0.0 if onset is None else 10.0 * (onset < STEPS)
    return rng.normal(0, 1, len(STEPS)) + rise


def time_only(onset, rng):
    """A signal that only grows with training time, in every group alike."""
    return (STEPS - 100) / 40 + rng.normal(0, 0.2, len(STEPS))


ZOOS = {"cal-a": {"add": 400, "sub": 550, "mul": None}, "cal-b": {"add": 450, "sub": 600, "mul": None},
        "eval-a": {"add": 300, "sub": 700, "mul": None}, "eval-never": {"add": None, "sub": None, "mul": None}}


def test_ground_truth_statuses():
    onsets = pd.DataFrame({"generalization_onset": [400.0, np.nan, 200.0],
                           "accuracy_at_memorization": [0.05, 0.04, 0.6]})
    assert ground_truth(onsets).tolist() == ["grokking", "never", "no_lag"]


def test_calibrated_tracker_finds_held_out_onsets_and_stays_silent_elsewhere():
    signals, truth = synthetic_zoos(ZOOS, tracker)
    rule, table = calibrate(signals, truth[truth["role"] == "calibration"], GRID, miss_cost=300)
    assert len(table) == len(GRID)
    result = outcomes(run_rule(signals, rule), truth[truth["role"] == "evaluation"])
    numbers = score(result)
    assert numbers["misses"] == 0 and numbers["false_alarms"] == 0 and numbers["never_zoos_with_alarm"] == 0
    assert numbers["onset_mae"] == 0.0 and numbers["mean_delay"] == 50.0 * rule.persistence


def test_a_step_only_signal_does_not_pass():
    """Calibrated on the same zoos, a signal that is only a function of time either fires in the
    groups that never generalize or misses the ones that do; the tracker costs far less."""
    evaluation = {k: v for k, v in ZOOS.items() if k.startswith("eval")}
    costs = {}
    for name, signal in (("tracker", tracker), ("time", time_only)):
        signals, truth = synthetic_zoos(ZOOS, signal)
        rule, _ = calibrate(signals, truth[truth["role"] == "calibration"], GRID, miss_cost=300)
        result = outcomes(run_rule(signals, rule), truth[truth["zoo"].isin(evaluation)])
        costs[name] = cost(result, miss_cost=300)
        if name == "time":
            assert score(result)["false_alarms"] + score(result)["misses"] >= 3
    assert costs["tracker"] < costs["time"] / 4


def test_calibration_never_sees_the_evaluation_zoos():
    """The calibrated rule and its cost table are the same whatever the evaluation zoos hold."""
    signals, truth = synthetic_zoos(ZOOS, tracker)
    calibration = truth[truth["role"] == "calibration"]
    scrambled = signals.copy()
    evaluation_rows = ~scrambled["zoo"].str.startswith("cal")
    scrambled.loc[evaluation_rows, "value"] = np.random.default_rng(9).normal(0, 50, evaluation_rows.sum())
    first, table_first = calibrate(signals, calibration, GRID, miss_cost=300)
    second, table_second = calibrate(scrambled, calibration, GRID, miss_cost=300)
    assert first == second
    pd.testing.assert_frame_equal(table_first, table_second)
    assert constant_rule(calibration) == Rule(RuleKind.constant, np.mean([400, 550, 450, 600]))


def test_ties_go_to_the_more_conservative_rule_and_errors_name_the_problem():
    signals, truth = synthetic_zoos({"cal": {"mul": None}}, lambda onset, rng: np.zeros(len(STEPS)))
    rule, _ = calibrate(signals, truth, GRID, miss_cost=300)  # every rule is silent: all cost 0
    assert rule == Rule(RuleKind.threshold, 16.0, 3)
    with pytest.raises(ValueError, match="at least one zoo"):
        calibrate(signals, truth.iloc[:0], GRID, miss_cost=300)
    with pytest.raises(ValueError, match="grokking group"):
        constant_rule(truth)


def test_outcomes_count_misses_false_alarms_and_silent_groups():
    truth = pd.DataFrame({"zoo": "z", "group": ["add", "sub", "mul"], "status": ["grokking", "grokking", "never"],
                          "accuracy_onset": [400.0, 500.0, np.nan]})
    detections = pd.DataFrame({"zoo": "z", "group": ["add", "mul"], "onset": [450.0, 300.0],
                               "alarm": [500.0, 350.0]})  # sub has no signal at all
    result = outcomes(detections, truth)
    numbers = score(result)
    assert (numbers["detected"], numbers["misses"], numbers["false_alarms"]) == (1, 1, 1)
    assert numbers["onset_mae"] == 50 and numbers["mean_delay"] == 100
    assert cost(result, miss_cost=300) == pytest.approx((50 + 300 + 300) / 3)
