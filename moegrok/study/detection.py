"""The study's cross-zoo tables: ground truth per group, collapse per zoo, every zoo's contrast, and
every detector and baseline scored leave one zoo out with bootstrap intervals
(moegrok/analysis/calibration.py).

Detectors: the threshold rule (moegrok/analysis/detector.py) on one metric's standardized signal in
one form: `others` (against the other non-canary groups' mean), `canary` (against the canary, a
control known before training), `self` (the group's own change since memorization, no contrast)
and `mul` (against `mul`, a control chosen from held-out accuracy: a labelled extra, never a
headline). The headline rows are the paper's two metrics (`pathway_distance`, `consistency`, all
positions) in the test-free forms (`others`, `canary`); every other (metric, form) pair is a
variant, and their number is reported. Every z combines the sample bootstrap with the contrast's
own trajectory noise (moegrok/analysis/contrast.py `with_trajectory_noise`).

Baselines, each told exactly what a detector is told (never fire in the canary): the step alone
(the other zoos' mean accuracy onset), the training loss under the detector's own rule and form,
a training-loss spike, and staying silent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moegrok.analysis.calibration import (
    FORMS,
    HEADLINE_FORMS,
    KNOWLEDGE,
    LOSS_SPIKE,
    SILENT,
    STEP_MEAN,
    TEST_KNOWLEDGE_FORMS,
    TRAINING_LOSS,
    Scored,
    bootstrap_draws,
    compare_costs,
    interval,
    leave_one_zoo_out,
    outcome_counts,
    rule_detections,
    scored_groups,
    series_by_group,
    step_only_lozo,
)
from moegrok.analysis.contrast import contrast_summary, with_trajectory_noise
from moegrok.analysis.detector import spike_grid, threshold_grid
from moegrok.analysis.onsets import ground_truth
from moegrok.config import StudyConfig
from moegrok.metrics.declarations import base_metric, direction
from moegrok.store import RunDir

NO_COLLAPSE_ACCURACY = 0.95  # train accuracy kept from memorization to generalization
GENERALIZED = 0.9
HEADLINE_METRICS = ("pathway_distance", "consistency")  # the paper's two metrics, declared before the study
MUL = "mul"


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


def mul_contrast(contrast: pd.DataFrame) -> pd.DataFrame:
    """Rows of the `mul` form: each group against `mul`, from the self rows. Groups are resampled
    independently, so se(did) = hypot(self_se of the group, self_se of mul)."""
    rows = contrast[(contrast["mode"] == "others") & contrast["did"].notna()]
    ref = rows[rows["group"] == MUL][["zoo", "metric", "step", "change", "self_se"]]
    ref = ref.rename(columns={"change": "reference_change", "self_se": "reference_se"})
    if ref.empty:
        return pd.DataFrame()
    out = rows[rows["group"] != MUL].drop(columns=["reference_change"], errors="ignore").merge(
        ref, on=["zoo", "metric", "step"])
    did = out["change"] - out["reference_change"]
    out = out.assign(mode="mul", reference=MUL, did=did, se=np.hypot(out["self_se"], out["reference_se"]))
    return with_trajectory_noise(out.drop(columns=["reference_se"]))


def signals(contrast: pd.DataFrame, form: str) -> pd.DataFrame:
    """Per metric, the detector input of one form: columns zoo, group, metric, step, value, start_step."""
    if form == "self":
        rows = contrast[contrast["mode"].isin(["others", "self"])]
        value = rows["self_z"]
    else:
        rows = contrast[contrast["mode"] == {"canary": "control"}.get(form, form)]
        value = rows["z"]
    out = rows.assign(value=value, start_step=rows["memorization_step"])
    return out[["zoo", "group", "metric", "step", "value", "start_step"]]


def _chosen(chosen: dict[str, str]) -> str:
    """The rule chosen per held-out zoo, compactly: "rule (zoos)"."""
    by_rule: dict[str, list[str]] = {}
    for zoo, rule in chosen.items():
        by_rule.setdefault(rule, []).append(zoo)
    return "; ".join(f"{rule} ({', '.join(zoos)})" for rule, zoos in by_rule.items())


def lozo_detections(contrast: pd.DataFrame, scored: Scored, cfg: StudyConfig, *, miss_cost: float,
                    cache: dict) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, str]]:
    """(onset, alarm, rules chosen) per (detector, form), every detector and baseline, leave one zoo
    out. `cache` keeps each rule's detections between miss costs."""
    grid = threshold_grid(cfg.detector.z_thresholds, cfg.detector.persistence)
    out = {}
    for form in FORMS:
        table = signals(contrast, form)
        for metric, series in table.groupby("metric", sort=True):
            if direction(metric) == 0:
                continue
            key = (metric, form)
            if key not in cache:
                by_group = series_by_group(series)
                cache[key] = [scored.align(rule_detections(by_group, rule)) for rule in grid]
            onset, alarm, chosen = leave_one_zoo_out(scored, cache[key], grid, miss_cost=miss_cost)
            out[key] = (onset, alarm, _chosen(chosen))
    levels = contrast[(contrast["metric"] == TRAINING_LOSS) & (contrast["mode"] == "others")]
    loss = series_by_group(levels.assign(value=levels["level"], start_step=levels["memorization_step"]))
    spikes = spike_grid(cfg.detector.spike_loss_rises)
    if LOSS_SPIKE not in cache:
        cache[LOSS_SPIKE] = [scored.align(rule_detections(loss, rule)) for rule in spikes]
    onset, alarm, chosen = leave_one_zoo_out(scored, cache[LOSS_SPIKE], spikes, miss_cost=miss_cost)
    out[LOSS_SPIKE, "baseline"] = (onset, alarm, _chosen(chosen))
    onset, alarm, chosen = step_only_lozo(scored, loss)
    out[STEP_MEAN, "baseline"] = (onset, alarm, _chosen(chosen))
    nothing = np.full(len(scored.keys), np.nan)
    out[SILENT, "baseline"] = (nothing, nothing, "never fires")
    return out


def _baselines(key: tuple[str, str]) -> list[tuple[str, str]]:
    metric, form = key
    found = [(STEP_MEAN, "baseline"), (LOSS_SPIKE, "baseline"), (SILENT, "baseline")]
    if form != "baseline" and metric != TRAINING_LOSS:
        found.insert(1, (TRAINING_LOSS, form))
    return found


def is_headline(metric: str, form: str) -> bool:
    return base_metric(metric) in HEADLINE_METRICS and form in HEADLINE_FORMS


def score_tables(detections: dict, scored: Scored, splits: dict[str, np.ndarray], *, miss_cost: float,
                 num_draws: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The detector table (counts and cost with its interval) and the comparisons (each rule's cost
    difference against each of its baselines, with interval and verdict), per split."""
    summary, comparisons = [], []
    for split, mask in splits.items():
        if not mask.any():
            continue
        draws = bootstrap_draws(int(mask.sum()), num_draws=num_draws, seed=seed)
        costs = {key: scored.costs(onset, alarm, miss_cost=miss_cost)[mask]
                 for key, (onset, alarm, _) in detections.items()}
        for key, (onset, alarm, chosen) in detections.items():
            mean, low, high = interval(costs[key], draws)
            summary.append({"detector": key[0], "form": key[1], "split": split, "miss_cost": miss_cost,
                            "headline": is_headline(*key), "knowledge": TEST_KNOWLEDGE_FORMS.get(key[1], KNOWLEDGE),
                            **outcome_counts(scored, onset, alarm, mask), "cost": mean, "cost_low": low,
                            "cost_high": high, "rules_chosen": chosen})
        named = {f"{k[0]} | {k[1]}": v for k, v in costs.items()}
        table = compare_costs(named, lambda name: [f"{b[0]} | {b[1]}" for b in _baselines(tuple(name.split(" | ")))],
                              draws)
        if len(table):
            parts = table["rule"].str.split(" | ", regex=False, expand=True)
            comparisons.append(table.assign(detector=parts[0], form=parts[1], split=split, miss_cost=miss_cost,
                                            headline=[is_headline(d, f) for d, f in zip(parts[0], parts[1],
                                                                                        strict=True)]))
    compared = pd.concat(comparisons, ignore_index=True) if comparisons else pd.DataFrame()
    return pd.DataFrame(summary), compared


def evaluate_detectors(contrast: pd.DataFrame, truth: pd.DataFrame, cfg: StudyConfig) -> dict[str, pd.DataFrame]:
    """Every detector and baseline, leave one zoo out, at every miss cost; the tables by name:
    detector and comparisons (at `detector.miss_cost`), sensitivity (headline rows and baselines at
    every `detector.miss_costs`) and groups_scored."""
    contrast = with_trajectory_noise(contrast)
    mul = mul_contrast(contrast) if cfg.control != MUL else pd.DataFrame()
    contrast = pd.concat([contrast, mul], ignore_index=True) if len(mul) else contrast
    truth = scored_groups(truth, canary=cfg.control, persistence=max(cfg.detector.persistence))
    scored = Scored(truth)
    family = scored.truth["family"].to_numpy() if "family" in scored.truth else np.full(len(scored.keys), "all")
    splits = {"all": np.ones(len(scored.keys), dtype=bool)}
    if len(set(family)) > 1:
        splits.update({f"family: {name}": family == name for name in sorted(set(family))})
    cache: dict = {}
    tables: dict[str, list[pd.DataFrame]] = {"detector": [], "comparisons": [], "sensitivity": [],
                                              "sensitivity_comparisons": [], "calibrated_rules": []}
    for miss_cost in sorted({cfg.detector.miss_cost, *cfg.detector.miss_costs}):
        detections = lozo_detections(contrast, scored, cfg, miss_cost=miss_cost, cache=cache)
        summary, compared = score_tables(detections, scored, splits, miss_cost=miss_cost,
                                         num_draws=cfg.detector.bootstrap_draws)
        if miss_cost == cfg.detector.miss_cost:
            tables["detector"].append(summary)
            tables["comparisons"].append(compared)
            tables["calibrated_rules"] = [shipped_rules(scored, cache, detections, cfg)]
        keep = summary["headline"] | (summary["form"] == "baseline")
        tables["sensitivity"].append(summary[keep])
        if len(compared):
            tables["sensitivity_comparisons"].append(compared[compared["headline"]])
    out = {name: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame() for name, frames in tables.items()}
    variants = out["detector"][out["detector"]["form"] != "baseline"][["detector", "form"]].drop_duplicates()
    out["detector"] = out["detector"].assign(variants_tried=len(variants))
    out["groups_scored"] = truth
    return out


SHIPPED = (("detector: pathway distance vs the other groups", "pathway_distance", "others"),
           ("training loss, same rule", TRAINING_LOSS, "others"), ("step only", STEP_MEAN, "baseline"))


def shipped_rules(scored: Scored, cache: dict, detections: dict, cfg: StudyConfig) -> pd.DataFrame:
    """calibrated_rules.csv (moegrok/analysis/verdicts.py): each shipped rule fitted on every zoo,
    with its error rates measured leave one zoo out."""
    grid = threshold_grid(cfg.detector.z_thresholds, cfg.detector.persistence)
    everything = np.ones(len(scored.keys), dtype=bool)
    rows = []
    for name, metric, form in SHIPPED:
        if (metric, form) not in detections:
            continue
        onset, alarm, _ = detections[metric, form]
        counts = outcome_counts(scored, onset, alarm, everything)
        if form == "baseline":
            grokking = scored.grokking
            if not grokking.any():
                continue
            rule = dict(metric=TRAINING_LOSS, form="others", kind="constant",
                        threshold=float(scored.accuracy_onset[grokking].mean()), persistence=1)
        else:
            costs = [scored.costs(o, a, miss_cost=cfg.detector.miss_cost).mean() for o, a in cache[metric, form]]
            best = min(sorted(range(len(grid)), key=lambda i: (-grid[i].threshold, -grid[i].persistence)),
                       key=lambda i: costs[i])
            rule = dict(metric=metric, form=form, kind="threshold", threshold=grid[best].threshold,
                        persistence=grid[best].persistence)
        rows.append({"name": name, **rule,
                     "false_alarm_rate": counts["false_alarms"] / max(counts["negatives"], 1),
                     "miss_rate": counts["misses"] / max(counts["grokking"], 1), "onset_mae": counts["onset_mae"],
                     "scored_groups": counts["groups"], "zoos": len(scored.zoos), "miss_cost": cfg.detector.miss_cost,
                     "source": "moegrok study (docs/findings.md): toy zoos, error rates leave one zoo out"})
    return pd.DataFrame(rows)


def study_tables(cfg: StudyConfig, zoos: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """groups, zoos (with collapse), contrast, contrast_summary and the detector tables."""
    out = Path(cfg.out_dir)
    groups, contrasts, dynamics = [], [], []
    for zoo in zoos.itertuples(index=False):
        run = RunDir(out / zoo.zoo)
        onsets = pd.read_parquet(run.onsets)
        onsets = onsets[onsets["memorization_rule"] == "train_accuracy"]  # causal memorization only
        contrast = pd.read_parquet(run.contrast).assign(zoo=zoo.zoo)
        steps = np.sort(contrast["step"].unique())
        truth = onsets.assign(zoo=zoo.zoo, family=zoo.setting, role=zoo.role, status=ground_truth(onsets),
                              accuracy_onset=onsets["generalization_onset"], last_step=float(steps.max()),
                              checkpoint_every=float(np.median(np.diff(steps))) if len(steps) > 1 else np.nan)
        train_log = pd.read_parquet(Path(zoo.zoo_dir) / "train_log.parquet")
        dynamics.append({"zoo": zoo.zoo, **zoo_dynamics(train_log, truth)})
        groups.append(truth)
        contrasts.append(contrast)
    zoo_table = zoos.merge(pd.DataFrame(dynamics), on="zoo")
    truth = pd.concat(groups, ignore_index=True).merge(zoo_table[["zoo", "collapse"]], on="zoo")
    contrast = pd.concat(contrasts, ignore_index=True)
    primary = contrast[contrast["mode"] == ("control" if cfg.control else "others")]
    summary = pd.concat([contrast_summary(part).assign(zoo=zoo) for zoo, part in primary.groupby("zoo")],
                        ignore_index=True).merge(truth[["zoo", "group", "status", "collapse"]], on=["zoo", "group"])
    return {"zoos": zoo_table, "groups": truth, "contrast": contrast, "contrast_summary": summary,
            **evaluate_detectors(contrast, truth, cfg)}
