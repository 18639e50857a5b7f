import numpy as np
import pytest

from moegrok.analysis.detector import Detection, Rule, RuleKind, detect, threshold_grid

STEPS = np.arange(0, 950, 50, dtype=float)  # 19 checkpoints, as in the toy zoo


def planted(onset_step: float, *, seed: int = 0, jump: float = 8.0, noise: float = 1.0) -> np.ndarray:
    """A standardized signal: noise until the planted onset, then a sustained rise."""
    rng = np.random.default_rng(seed)
    return rng.normal(0, noise, len(STEPS)) + jump * (onset_step < STEPS)


def test_a_planted_onset_is_found_on_the_accuracy_onset_convention():
    rule = Rule(RuleKind.threshold, 4.0, 2)
    found = detect(STEPS, planted(400), start_step=100, rule=rule)
    assert found == Detection(onset=400.0, alarm=500.0)  # last checkpoint before the rise; declared one later
    assert detect(STEPS, planted(400), start_step=100, rule=Rule(RuleKind.threshold, 4.0, 1)).alarm == 450


@pytest.mark.parametrize("seed", range(5))
def test_noise_alone_stays_silent(seed):
    found = detect(STEPS, planted(10_000, seed=seed), start_step=100, rule=Rule(RuleKind.threshold, 4.0, 2))
    assert not found.fired and np.isnan(found.onset)


def test_nothing_before_the_memorization_step_counts():
    values = planted(400)
    values[:5] = 50.0  # a huge value before memorization (steps 0-200)
    assert detect(STEPS, values, start_step=250, rule=Rule(RuleKind.threshold, 4.0, 2)).onset == 400


def test_the_rule_is_causal():
    """Whatever happens after the alarm cannot change the detection, and a prefix of the series
    gives the same answer as soon as it contains the alarm checkpoint."""
    rule = Rule(RuleKind.threshold, 4.0, 2)
    values = planted(400)
    found = detect(STEPS, values, start_step=100, rule=rule)
    future = values.copy()
    future[found.alarm < STEPS] = -100.0
    assert detect(STEPS, future, start_step=100, rule=rule) == found
    cut = found.alarm >= STEPS
    assert detect(STEPS[cut], values[cut], start_step=100, rule=rule) == found
    earlier = found.alarm > STEPS
    assert not detect(STEPS[earlier], values[earlier], start_step=100, rule=rule).fired


def test_persistence_needs_consecutive_checkpoints():
    values = np.zeros(len(STEPS))
    values[[6, 8, 10]] = 10.0  # isolated blips
    assert not detect(STEPS, values, start_step=0, rule=Rule(RuleKind.threshold, 4.0, 2)).fired
    assert detect(STEPS, values, start_step=0, rule=Rule(RuleKind.threshold, 4.0, 1)).onset == 250


def test_spike_rule_and_constant_rule():
    loss = np.full(len(STEPS), 0.05)
    loss[7] = 5.0  # the collapse at step 350
    assert detect(STEPS, loss, start_step=100, rule=Rule(RuleKind.spike, 1.0)) == Detection(350.0, 350.0)
    assert not detect(STEPS, loss, start_step=400, rule=Rule(RuleKind.spike, 1.0)).fired
    constant = Rule(RuleKind.constant, 430.0)
    assert detect(STEPS, loss, start_step=100, rule=constant) == Detection(430.0, 450.0)
    assert not detect(STEPS[:5], loss[:5], start_step=0, rule=constant).fired  # the run ends before it


def test_a_function_of_step_fires_in_every_group():
    """A signal that only grows with time says nothing about which group generalizes: it fires in
    a group that never generalizes exactly as in one that does (the study counts those as false
    alarms)."""
    rule = Rule(RuleKind.threshold, 4.0, 2)
    time_only = (STEPS - 100) / 50
    assert detect(STEPS, time_only, start_step=100, rule=rule) == Detection(250.0, 350.0)


def test_bad_rules_and_series_name_the_value():
    with pytest.raises(ValueError, match="persistence=0"):
        Rule(RuleKind.threshold, 2.0, 0)
    with pytest.raises(ValueError, match="threshold=nan"):
        Rule(RuleKind.threshold, float("nan"))
    with pytest.raises(ValueError, match="shape"):
        detect(STEPS, np.zeros(3), start_step=0, rule=Rule(RuleKind.threshold, 1.0))
    assert len(threshold_grid([1.0, 2.0], [1, 2, 3])) == 6
