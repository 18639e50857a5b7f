"""Causal rules that declare "group G generalizes from step s" from training-side data, or stay silent.

Every rule sees a group's series from its memorization checkpoint t0 (train accuracy >= 0.99) up
to the checkpoint it is at, never later ones, and returns a Detection: the claimed `onset` (on the
accuracy onset's convention: the last checkpoint before the rise) and the `alarm` step, the
checkpoint at which the rule could first say so. Both are NaN when it stays silent.

* threshold (the detector): the first run of `persistence` consecutive checkpoints after t0 where
  a standardized signal (a contrast's z, moegrok/analysis/contrast.py) is >= `threshold`; onset = the
  checkpoint before the run, alarm = its last checkpoint.
* spike (baseline): the first checkpoint after t0 where the training loss exceeds its minimum
  since t0 by >= `threshold` (a loss spike: the "slingshot" a collapse-and-relearn run shows);
  onset = alarm = that checkpoint.
* constant (step-only baseline): onset = a fixed step, alarm = the first checkpoint at or after it;
  it fires in every memorized group whose run reaches it.
* lag (step-only baseline): the same, at a fixed number of steps after t0.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

NAN = float("nan")


class RuleKind(StrEnum):
    threshold = "threshold"
    spike = "spike"
    constant = "constant"
    lag = "lag"


@dataclass(frozen=True)
class Rule:
    kind: RuleKind
    threshold: float = NAN  # threshold: z units; spike: loss units; constant: the onset step; lag: steps after t0
    persistence: int = 1  # threshold rule only: consecutive checkpoints at or above

    def __post_init__(self) -> None:
        if self.kind not in tuple(RuleKind):
            raise ValueError(f"rule kind={self.kind!r}: expected one of {', '.join(RuleKind)}")
        if not np.isfinite(self.threshold):
            raise ValueError(f"rule threshold={self.threshold!r}: expected a finite number")
        if self.persistence < 1:
            raise ValueError(f"rule persistence={self.persistence!r}: expected >= 1")

    def label(self) -> str:
        if self.kind == RuleKind.threshold:
            return f"z >= {self.threshold:g} x {self.persistence}"
        if self.kind == RuleKind.spike:
            return f"loss spike >= {self.threshold:g}"
        if self.kind == RuleKind.lag:
            return f"onset {self.threshold:g} steps after memorization"
        return f"onset at step {self.threshold:g}"


@dataclass(frozen=True)
class Detection:
    onset: float = NAN
    alarm: float = NAN

    @property
    def fired(self) -> bool:
        return bool(np.isfinite(self.alarm))


def _after(steps: np.ndarray, values: np.ndarray, start_step: float) -> tuple[np.ndarray, np.ndarray]:
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if steps.shape != values.shape:
        raise ValueError(f"steps {steps.shape} and values {values.shape} differ in shape")
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    keep = steps >= start_step
    return steps[keep], values[keep]


def detect(steps: np.ndarray, values: np.ndarray, *, start_step: float, rule: Rule) -> Detection:
    """Apply `rule` to one group's series (steps, values) from `start_step` (its t0) on. The value
    at index i is only compared with values at indices <= i."""
    steps, values = _after(steps, values, start_step)
    if rule.kind in (RuleKind.constant, RuleKind.lag):
        claimed = rule.threshold + (start_step if rule.kind == RuleKind.lag else 0.0)
        reached = steps[steps >= claimed]
        return Detection(claimed, float(reached[0])) if len(reached) else Detection()
    if len(steps) < 2:
        return Detection()
    if rule.kind == RuleKind.spike:
        running_min = np.minimum.accumulate(np.where(np.isfinite(values), values, np.inf))
        for i in range(1, len(steps)):
            if np.isfinite(values[i]) and values[i] - running_min[i - 1] >= rule.threshold:
                return Detection(float(steps[i]), float(steps[i]))
        return Detection()
    above = np.isfinite(values) & (values >= rule.threshold)
    above[0] = False  # t0 itself: no change yet
    run = 0
    for i in range(1, len(steps)):
        run = run + 1 if above[i] else 0
        if run == rule.persistence:
            return Detection(float(steps[i - rule.persistence]), float(steps[i]))
    return Detection()


def threshold_grid(thresholds: list[float], persistences: list[int]) -> list[Rule]:
    return [Rule(RuleKind.threshold, float(t), int(m)) for t in thresholds for m in persistences]


def spike_grid(thresholds: list[float]) -> list[Rule]:
    return [Rule(RuleKind.spike, float(t)) for t in thresholds]


def step_grid(steps: list[float], *, kind: RuleKind) -> list[Rule]:
    """Constant onsets (kind constant) or lags after memorization (kind lag) at these steps."""
    return [Rule(kind, float(step)) for step in sorted(set(steps))]
