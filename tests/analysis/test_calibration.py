import numpy as np
import pandas as pd

from moegrok.analysis.calibration import (
    Scored,
    bootstrap_draws,
    compare_costs,
    group_costs,
    interval,
    leave_one_zoo_out,
    outcome_counts,
    rule_detections,
    scored_groups,
    series_by_group,
    step_only_lozo,
    verdict,
)
from moegrok.analysis.detector import threshold_grid
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
            truth.append({"zoo": zoo, "group": group, "status": "grokking" if accuracy_onset is not None else "never",
                          "accuracy_onset": np.nan if accuracy_onset is None else accuracy_onset,
                          "last_step": STEPS[-1], "checkpoint_every": 50.0})
    return pd.concat(signals, ignore_index=True), pd.DataFrame(truth)


def tracker(onset, rng):
    """A signal that rises where accuracy rises (plus noise), flat where it never does."""
    rise = 0.0 if onset is None else 10.0 * (onset < STEPS)
    return rng.normal(0, 1, len(STEPS)) + rise


def time_only(onset, rng):
    """A signal that only grows with training time, in every group alike."""
    return (STEPS - 100) / 40 + rng.normal(0, 0.2, len(STEPS))


ZOOS = {"a": {"add": 400, "sub": 550, "mul": None, "canary": None},
        "b": {"add": 450, "sub": 600, "mul": None, "canary": None},
        "c": {"add": 300, "sub": 700, "mul": None, "canary": None},
        "never": {"add": None, "sub": None, "mul": None, "canary": None}}


def lozo(signal):
    signals, truth = synthetic_zoos(ZOOS, signal)
    scored = Scored(scored_groups(truth, canary="canary", persistence=3))
    by_group = series_by_group(signals)
    detections = [scored.align(rule_detections(by_group, rule)) for rule in GRID]
    return scored, by_group, leave_one_zoo_out(scored, detections, GRID, miss_cost=300)


def test_ground_truth_statuses():
    onsets = pd.DataFrame({"generalization_onset": [400.0, np.nan, 200.0],
                           "accuracy_at_memorization": [0.05, 0.04, 0.6]})
    assert ground_truth(onsets).tolist() == ["grokking", "never", "no_lag"]


def test_canary_no_lag_and_late_onsets_are_not_scored():
    truth = pd.DataFrame({"zoo": "z", "group": ["add", "sub", "mul", "canary", "div"],
                          "status": ["grokking", "grokking", "no_lag", "never", "never"],
                          "accuracy_onset": [400.0, 850.0, np.nan, np.nan, np.nan], "last_step": 900.0,
                          "checkpoint_every": 50.0})
    scored = scored_groups(truth, canary="canary", persistence=3)
    assert scored["scored"].tolist() == [True, False, False, False, True]
    assert scored["excluded"].str.startswith("censored").sum() == 1  # 850 is one checkpoint before the end
    assert scored.loc[3, "excluded"].startswith("canary")


def test_cost_counts_onset_error_and_delay_and_caps_at_a_miss():
    grokking = np.array([True, True, True, False, False])
    onset = np.array([350.0, 400.0, np.nan, 500.0, np.nan])
    alarm = np.array([450.0, 200.0, np.nan, 550.0, np.nan])
    costs = group_costs(onset, alarm, np.full(5, 400.0), grokking, miss_cost=300)
    # |error| 50 + delay 50; an alarm before the onset (a lead) costs its error 0; a miss; a false alarm; silence
    assert costs.tolist() == [100.0, 0.0, 300.0, 300.0, 0.0]
    late = group_costs(np.array([100.0]), np.array([900.0]), np.array([400.0]), np.array([True]), miss_cost=300)
    assert late.tolist() == [300.0]


def test_leave_one_zoo_out_tracker_finds_onsets_and_stays_silent_elsewhere():
    scored, _, (onset, alarm, chosen) = lozo(tracker)
    assert set(chosen) == {"a", "b", "c", "never"}
    counts = outcome_counts(scored, onset, alarm, np.ones(len(scored.keys), dtype=bool))
    assert counts["grokking"] == 6 and counts["negatives"] == 6  # the canary is not scored
    assert counts["misses"] == 0 and counts["false_alarms"] == 0 and counts["onset_mae"] == 0.0


def test_a_held_out_zoo_never_changes_its_own_rule():
    """The rule applied to zoo c is the same whatever c's signals are."""
    scored, by_group, (_, _, chosen) = lozo(tracker)
    scrambled = {k: (s, -v * 7 if k[0] == "c" else v, t) for k, (s, v, t) in by_group.items()}
    detections = [scored.align(rule_detections(scrambled, rule)) for rule in GRID]
    assert leave_one_zoo_out(scored, detections, GRID, miss_cost=300)[2]["c"] == chosen["c"]


def test_intervals_and_verdicts_separate_better_worse_and_no_evidence():
    scored, by_group, (onset, alarm, _) = lozo(tracker)
    _, _, (t_onset, t_alarm, _) = lozo(time_only)
    draws = bootstrap_draws(len(scored.keys), num_draws=500, seed=0)
    costs = {"tracker": scored.costs(onset, alarm, miss_cost=300),
             "time": scored.costs(t_onset, t_alarm, miss_cost=300)}
    mean, low, high = interval(costs["time"], draws)
    assert low <= mean <= high and high > low
    table = compare_costs(costs, lambda name: ["tracker", "time"], draws).set_index(["rule", "baseline"])
    assert table.loc[("tracker", "time"), "verdict"] == "better than"
    assert table.loc[("time", "tracker"), "verdict"] == "worse than"
    assert verdict(-5.0, 3.0) == "no evidence either way"
    _, step_alarm, chosen = step_only_lozo(scored, by_group)
    assert chosen["a"] == "onset at step 512.5"  # b's and c's mean onset: the held-out zoo is not used
    assert np.isfinite(step_alarm).sum() == len(scored.keys)  # it fires wherever training reaches the step
