"""Score causal detectors of a group's generalization onset, leave one zoo out, with intervals.

Ground truth per (zoo, group): its status from held-out accuracy (moegrok/analysis/onsets.py,
never shown to a rule). Which groups are scored (`scored_groups`):

* a canary group (random labels, known before training never to generalize) is not scored: every
  rule, baselines included, is told never to fire there, the one piece of knowledge a rule gets;
* a `no_lag` group (it generalized as it memorized) is neither a positive nor a negative;
* a grokking group whose accuracy onset lies within `persistence` checkpoints of the run's end is
  censored: no rule needing that many checkpoints could see it.

Cost of a rule in one scored group, in steps (`group_costs`): a detected grokking group costs
|claimed onset - accuracy onset| plus the alarm's delay after the accuracy onset (0 for an alarm
before it), at most `miss_cost`; a miss or an alarm in a group that never generalizes costs
`miss_cost`. An alarm before the accuracy onset of a group that later generalizes is a lead, not a
false alarm; leads are counted apart.

Calibration is leave one zoo out: each zoo's groups are scored with the rule of the grid that has
the lowest mean cost over the other zoos (ties: the higher threshold, then the longer persistence).
Intervals come from a bootstrap over scored groups, with the same draws for every rule, so a cost
difference between two rules has its own interval (`compare_costs`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from moegrok.analysis.detector import Rule, RuleKind, detect

STEP_MEAN = "step only: mean onset of the other zoos (baseline)"
LOSS_SPIKE = "training-loss spike (baseline)"
SILENT = "always silent (baseline)"
TRAINING_LOSS = "loss_mean"  # the training loss under the detector's own rule and form
# the forms of a detector's signal: against the other (non-canary) groups' mean, against the canary,
# the group's own change, and against `mul` (a control chosen with held-out accuracy: an extra)
FORMS = ("others", "canary", "self", "mul")
HEADLINE_FORMS = ("others", "canary")  # test-free: no held-out accuracy chose their reference
TEST_KNOWLEDGE_FORMS = {"mul": "extra: mul chosen as control from held-out accuracy (test knowledge)"}
KNOWLEDGE = "told only: never fire in the canary group"


def headline_form(control: str | None) -> str:
    """The form of the study's main table: against the canary when the study has one."""
    return "canary" if control else "others"


def scored_groups(truth: pd.DataFrame, *, canary: str | None, persistence: int) -> pd.DataFrame:
    """`truth` (zoo, group, status, accuracy_onset, last_step, checkpoint_every) with `scored` and
    `excluded` (why not)."""
    excluded = np.full(len(truth), "", dtype=object)
    onset_index = (truth["last_step"] - truth["accuracy_onset"]) / truth["checkpoint_every"]
    censored = (truth["status"] == "grokking") & (onset_index < persistence)
    excluded[censored.to_numpy()] = f"censored: onset within {persistence} checkpoints of the end"
    excluded[(truth["status"] == "no_lag").to_numpy()] = "no lag (generalized as it memorized)"
    if canary is not None:
        excluded[(truth["group"] == canary).to_numpy()] = "canary (every rule is told never to fire here)"
    return truth.assign(scored=excluded == "", excluded=excluded)


def group_costs(onset: np.ndarray, alarm: np.ndarray, accuracy_onset: np.ndarray, grokking: np.ndarray, *,
                miss_cost: float) -> np.ndarray:
    """Per group, the cost in steps of one rule's detections (NaN alarm: silent); see the module."""
    fired = np.isfinite(alarm)
    with np.errstate(invalid="ignore"):
        found = np.abs(onset - accuracy_onset) + np.maximum(alarm - accuracy_onset, 0.0)
    detected = np.minimum(np.nan_to_num(found, nan=miss_cost), miss_cost)
    return np.where(grokking, np.where(fired, detected, miss_cost), np.where(fired, miss_cost, 0.0))


class Scored:
    """The scored groups of a study as arrays, in a fixed order (zoo, group)."""

    def __init__(self, truth: pd.DataFrame) -> None:
        self.truth = truth[truth["scored"]].sort_values(["zoo", "group"]).reset_index(drop=True)
        self.keys = list(zip(self.truth["zoo"], self.truth["group"], strict=True))
        self.grokking = (self.truth["status"] == "grokking").to_numpy()
        self.accuracy_onset = self.truth["accuracy_onset"].to_numpy(float)
        self.zoo = self.truth["zoo"].to_numpy()
        self.zoos = sorted(set(self.zoo))

    def align(self, detections: dict[tuple[str, str], tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
        """(onset, alarm) per scored group; a group without a detection is silent."""
        pairs = [detections.get(key, (np.nan, np.nan)) for key in self.keys]
        return np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float)

    def costs(self, onset: np.ndarray, alarm: np.ndarray, *, miss_cost: float) -> np.ndarray:
        return group_costs(onset, alarm, self.accuracy_onset, self.grokking, miss_cost=miss_cost)


def series_by_group(signals: pd.DataFrame) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, float]]:
    """(steps, values, start_step) per (zoo, group) of a signal table (zoo, group, step, value, start_step)."""
    return {(zoo, group): (part["step"].to_numpy(float), part["value"].to_numpy(float),
                           float(part["start_step"].iloc[0]))
            for (zoo, group), part in signals.groupby(["zoo", "group"], sort=True)}


def rule_detections(series: dict, rule: Rule) -> dict[tuple[str, str], tuple[float, float]]:
    """(onset, alarm) of one rule in every group."""
    out = {}
    for key, (steps, values, start) in series.items():
        found = detect(steps, values, start_step=start, rule=rule)
        out[key] = (found.onset, found.alarm)
    return out


def _conservative_order(rules: list[Rule]) -> list[int]:
    """Indices of `rules` from the most conservative (highest threshold, longest persistence)."""
    return sorted(range(len(rules)), key=lambda i: (-rules[i].threshold, -rules[i].persistence))


def leave_one_zoo_out(scored: Scored, detections: list[tuple[np.ndarray, np.ndarray]], rules: list[Rule], *,
                      miss_cost: float) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Each zoo's (onset, alarm) from the rule with the lowest cost on the other zoos' groups, and
    the rule chosen per held-out zoo. `detections[i]`: rule i's aligned (onset, alarm)."""
    costs = np.stack([scored.costs(onset, alarm, miss_cost=miss_cost) for onset, alarm in detections])
    order = _conservative_order(rules)
    onset_out, alarm_out = np.full(len(scored.keys), np.nan), np.full(len(scored.keys), np.nan)
    chosen = {}
    for zoo in scored.zoos:
        held = scored.zoo == zoo
        if (~held).any():
            mean_cost = costs[:, ~held].mean(axis=1)
            best = min(order, key=lambda i: mean_cost[i])  # stable: the first (most conservative) of the ties
        else:
            best = order[0]
        onset_out[held], alarm_out[held] = detections[best][0][held], detections[best][1][held]
        chosen[zoo] = rules[best].label()
    return onset_out, alarm_out, chosen


def step_only_lozo(scored: Scored, series: dict) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """The step-only baseline: each zoo's groups get onset = the mean accuracy onset of the other
    zoos' scored grokking groups (silent without one)."""
    onset_out, alarm_out = np.full(len(scored.keys), np.nan), np.full(len(scored.keys), np.nan)
    chosen = {}
    for zoo in scored.zoos:
        others = (scored.zoo != zoo) & scored.grokking
        if not others.any():
            chosen[zoo] = "silent (no grokking group elsewhere)"
            continue
        rule = Rule(RuleKind.constant, float(scored.accuracy_onset[others].mean()))
        found = scored.align(rule_detections({k: v for k, v in series.items() if k[0] == zoo}, rule))
        held = scored.zoo == zoo
        onset_out[held], alarm_out[held] = found[0][held], found[1][held]
        chosen[zoo] = rule.label()
    return onset_out, alarm_out, chosen


def outcome_counts(scored: Scored, onset: np.ndarray, alarm: np.ndarray, mask: np.ndarray) -> dict:
    """Counts of one rule's outcomes over the groups in `mask`."""
    fired, grokking = np.isfinite(alarm) & mask, scored.grokking & mask
    lead = fired & grokking & (alarm < scored.accuracy_onset)
    error = np.abs(onset - scored.accuracy_onset)[fired & grokking]
    delay = (alarm - scored.accuracy_onset)[fired & grokking]
    return {"groups": int(mask.sum()), "grokking": int(grokking.sum()),
            "negatives": int((mask & ~scored.grokking).sum()),
            "detected": int((fired & grokking).sum()), "misses": int((grokking & ~fired).sum()),
            "false_alarms": int((fired & ~scored.grokking).sum()), "leads": int(lead.sum()),
            "median_lead": float(np.median((scored.accuracy_onset - alarm)[lead])) if lead.any() else np.nan,
            "onset_mae": float(error.mean()) if len(error) else np.nan,
            "mean_delay": float(delay.mean()) if len(delay) else np.nan}


def bootstrap_draws(num_groups: int, *, num_draws: int, seed: int) -> np.ndarray:
    """Indices (draws, groups) of a bootstrap over groups; the same draws for every rule."""
    return np.random.default_rng(seed).integers(0, num_groups, size=(num_draws, num_groups))


def interval(values: np.ndarray, draws: np.ndarray) -> tuple[float, float, float]:
    """(mean, 2.5%, 97.5%) of the mean of per-group values under the bootstrap draws."""
    if len(values) == 0:
        return np.nan, np.nan, np.nan
    means = values[draws].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(values.mean()), float(low), float(high)


def verdict(low: float, high: float) -> str:
    """What an interval of (rule - baseline) cost says: lower cost is better."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "no evidence either way"
    if high < 0:
        return "better than"
    if low > 0:
        return "worse than"
    return "no evidence either way"


def compare_costs(costs: dict[str, np.ndarray], baselines: Callable[[str], list[str]], draws: np.ndarray
                  ) -> pd.DataFrame:
    """Per rule and each of its baselines: the mean cost difference (rule - baseline) with its
    bootstrap interval and verdict."""
    rows = []
    for name, values in costs.items():
        for baseline in baselines(name):
            if baseline == name or baseline not in costs:
                continue
            diff, low, high = interval(values - costs[baseline], draws)
            rows.append({"rule": name, "baseline": baseline, "difference": diff, "diff_low": low,
                         "diff_high": high, "verdict": verdict(low, high)})
    return pd.DataFrame(rows)
