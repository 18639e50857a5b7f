"""The study's cross-zoo tables: ground truth per group, collapse per zoo, every zoo's contrast, and
the detector calibrated on the calibration zoos and evaluated on the evaluation zoos, beside the
baselines (step only, the training loss under the same rule, training-loss spikes).

Detectors: the threshold rule (moegrok/analysis/detector.py) on one metric's standardized signal in one
form: `control` (contrast against the control group), `others` (against the other groups' mean)
or `self` (the group's own change since memorization, no contrast). The pre-declared headline form
is `control` when the study has a control group, else `others`; every other (metric, form) pair
is a variant, and their number is reported beside the best.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moegrok.analysis.calibration import (
    FORMS,
    LOSS_SPIKE,
    SILENT,
    STEP_FIT,
    STEP_LAG,
    STEP_MEAN,
    STEP_ONLY,
    calibrate,
    constant_rule,
    cost,
    headline_form,
    outcomes,
    run_rule,
    score,
)
from moegrok.analysis.contrast import contrast_summary
from moegrok.analysis.detector import Rule, RuleKind, spike_grid, step_grid, threshold_grid
from moegrok.analysis.onsets import ground_truth
from moegrok.config import StudyConfig
from moegrok.metrics.declarations import direction
from moegrok.store import RunDir

NO_COLLAPSE_ACCURACY = 0.95  # train accuracy kept from memorization to generalization
GENERALIZED = 0.9


def zoo_dynamics(train_log: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """Whether training collapsed: the lowest train accuracy (training log) of a grokking group
    between its memorization and held-out >= 0.9 (else the end); without a grokking group, of any
    memorized group after its memorization. Also the count of logged train-loss jumps > 1.0."""
    lows, jumps = [], 0
    grokking = truth[truth["status"] == "grokking"]
    chosen = grokking if len(grokking) else truth
    for row in chosen.itertuples(index=False):
        log = train_log[train_log["group"] == row.group].sort_values("step")
        after = log[log["step"] >= row.memorization_step]
        generalized = after.loc[after["heldout_acc"] >= GENERALIZED, "step"]
        end = generalized.iloc[0] if len(grokking) and len(generalized) else log["step"].max()
        lows.append(float(after.loc[after["step"] <= end, "train_acc"].min()))
    for _, log in train_log.groupby("group"):
        jumps += int((log.sort_values("step")["train_loss"].diff() > 1.0).sum())
    low = min(lows) if lows else float("nan")
    return {"min_train_acc": low, "loss_jumps": jumps, "collapse": bool(low < NO_COLLAPSE_ACCURACY)}


def signals(contrast: pd.DataFrame, form: str) -> pd.DataFrame:
    """Per metric, the detector input of one form: columns zoo, group, metric, step, value, start_step."""
    if form == "self":
        rows = contrast[contrast["mode"].isin(["others", "self"])]
        value = rows["self_z"]
    else:
        rows = contrast[contrast["mode"] == form]
        value = rows["z"]
    out = rows.assign(value=value, start_step=rows["memorization_step"])
    return out[["zoo", "group", "metric", "step", "value", "start_step"]]


def _evaluate(name: str, form: str, rule: Rule, series: pd.DataFrame, truth: pd.DataFrame, *,
              miss_cost: float) -> tuple[list[dict], pd.DataFrame]:
    result = outcomes(run_rule(series, rule), truth)
    rows = []
    for split, part in (("calibration (in-sample)", result[result["role"] == "calibration"]),
                        ("evaluation: all", result[result["role"] == "evaluation"]),
                        ("evaluation: collapse", result[(result["role"] == "evaluation") & result["collapse"]]),
                        ("evaluation: no collapse", result[(result["role"] == "evaluation") & ~result["collapse"]])):
        if len(part):
            rows.append({"detector": name, "form": form, "rule": rule.label(), "split": split,
                         "cost": cost(part, miss_cost=miss_cost), **score(part)})
    return rows, result.assign(detector=name, form=form, rule=rule.label())


def evaluate_detectors(contrast: pd.DataFrame, truth: pd.DataFrame, cfg: StudyConfig) -> dict[str, pd.DataFrame]:
    """Calibrate every detector and baseline on the calibration zoos, evaluate on all zoos."""
    grid = threshold_grid(cfg.detector.z_thresholds, cfg.detector.persistence)
    calibration_truth = truth[truth["role"] == "calibration"]
    miss_cost = cfg.detector.miss_cost
    summary, detections, calibration = [], [], []
    forms = [f for f in FORMS if f != "control" or cfg.control]
    for form in forms:
        for metric, series in signals(contrast, form).groupby("metric", sort=True):
            if direction(metric) == 0:
                continue
            rule, table = calibrate(series, calibration_truth, grid, miss_cost=miss_cost)
            calibration.append(table.assign(detector=metric, form=form))
            rows, result = _evaluate(metric, form, rule, series, truth, miss_cost=miss_cost)
            summary += rows
            detections.append(result)
    levels = contrast[(contrast["metric"] == "loss_mean") & (contrast["mode"] == "others")]
    loss = levels.assign(value=levels["level"], start_step=levels["memorization_step"])[
        ["zoo", "group", "metric", "step", "value", "start_step"]]  # the group's training loss itself
    seen = loss[loss["zoo"].isin(calibration_truth["zoo"])]  # candidate onsets and lags: calibration zoos only
    steps = sorted(seen["step"].unique())
    lags = sorted({step - start for step in steps for start in seen["start_step"].unique() if step > start})
    baselines = {LOSS_SPIKE: spike_grid(cfg.detector.spike_loss_rises),
                 STEP_FIT: step_grid(steps, kind=RuleKind.constant), STEP_LAG: step_grid(lags, kind=RuleKind.lag)}
    chosen = {}
    for name, rules in baselines.items():
        chosen[name], table = calibrate(loss, calibration_truth, rules, miss_cost=miss_cost)
        calibration.append(table.assign(detector=name, form="baseline"))
    if (calibration_truth["status"] == "grokking").any():
        chosen[STEP_MEAN] = constant_rule(calibration_truth)
    for name, rule in chosen.items():
        rows, result = _evaluate(name, "baseline", rule, loss, truth, miss_cost=miss_cost)
        summary += rows
        detections.append(result)
    return {"detector": compare(pd.DataFrame(summary), headline=headline_form(cfg.control), miss_cost=miss_cost,
                                margin=cfg.detector.margin),
            "detections": pd.concat(detections, ignore_index=True),
            "calibration": pd.concat(calibration, ignore_index=True)}


def compare(summary: pd.DataFrame, *, headline: str, miss_cost: float, margin: float) -> pd.DataFrame:
    """Per detector and split, whether its cost is lower, by at least `margin`, than: the best
    step-only baseline's on that split (the strictest comparison), the training-loss detector's
    (loss_mean under the same rule and form), the loss-spike baseline's, and staying silent
    (a miss in every grokking group). `beats_all_baselines` needs all four."""
    def baseline_cost(name: str, form: str | None = None) -> pd.Series:
        rows = summary[(summary["detector"] == name) & ((summary["form"] == form) if form else True)]
        return rows.set_index("split")["cost"]

    step = pd.concat([baseline_cost(name) for name in STEP_ONLY if name in set(summary["detector"])],
                     axis=1).min(axis=1)  # the best step-only rule
    spike = baseline_cost(LOSS_SPIKE)
    counts = summary.groupby("split")[["grokking_groups", "negative_groups"]].first()
    silent = miss_cost * counts["grokking_groups"] / (counts["grokking_groups"] + counts["negative_groups"])
    out = summary.copy()
    loss_cost = [baseline_cost("loss_mean", form).get(split, np.nan) if form != "baseline" else np.nan
                 for form, split in zip(out["form"], out["split"], strict=True)]
    out["beats_step"] = out["cost"] < out["split"].map(step) - margin
    out["beats_training_loss"] = out["cost"] < np.asarray(loss_cost) - margin
    out["beats_loss_spike"] = out["cost"] < out["split"].map(spike) - margin
    out["beats_silence"] = out["cost"] < out["split"].map(silent) - margin
    out["beats_all_baselines"] = out[["beats_step", "beats_training_loss", "beats_loss_spike", "beats_silence"]].all(1)
    out["headline"] = out["form"] == headline
    silent_rows = counts.assign(cost=silent, detected=0, misses=counts["grokking_groups"], false_alarms=0,
                                detector=SILENT, form="baseline", rule="never fires").reset_index()
    return pd.concat([out, silent_rows], ignore_index=True)


def study_tables(cfg: StudyConfig, zoos: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """groups, zoos (with collapse), contrast, contrast_summary and the detector tables."""
    out = Path(cfg.out_dir)
    groups, contrasts, dynamics = [], [], []
    for zoo in zoos.itertuples(index=False):
        run = RunDir(out / zoo.zoo)
        onsets = pd.read_parquet(run.onsets)
        onsets = onsets[onsets["memorization_rule"] == "train_accuracy"]  # causal memorization only
        truth = onsets.assign(zoo=zoo.zoo, role=zoo.role, status=ground_truth(onsets),
                              accuracy_onset=onsets["generalization_onset"])
        train_log = pd.read_parquet(Path(zoo.zoo_dir) / "train_log.parquet")
        dynamics.append({"zoo": zoo.zoo, **zoo_dynamics(train_log, truth)})
        groups.append(truth)
        contrasts.append(pd.read_parquet(run.contrast).assign(zoo=zoo.zoo))
    zoo_table = zoos.merge(pd.DataFrame(dynamics), on="zoo")
    truth = pd.concat(groups, ignore_index=True).merge(zoo_table[["zoo", "collapse"]], on="zoo")
    contrast = pd.concat(contrasts, ignore_index=True)
    primary = contrast[contrast["mode"] == headline_form(cfg.control)]
    summary = pd.concat([contrast_summary(part).assign(zoo=zoo) for zoo, part in primary.groupby("zoo")],
                        ignore_index=True).merge(truth[["zoo", "group", "status", "collapse"]], on=["zoo", "group"])
    return {"zoos": zoo_table, "groups": truth, "contrast": contrast, "contrast_summary": summary,
            **evaluate_detectors(contrast, truth, cfg)}

