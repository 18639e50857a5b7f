"""Does a training-sample metric track generalization? Onsets, correlations, trivial baselines.

Reads only stored tables (metrics.parquet, accuracy.parquet, memorized.parquet).

Rules (the README documents them):
* Memorization step of a group: `moegrok.memorization.memorization_steps` (train accuracy, else
  the loss rule).
* Onset of a curve: orient it so that "generalizing" is up, take its level at the first
  checkpoint at/after the memorization step as the baseline; the onset is the last checkpoint
  before the curve rises by at least `min_rise` above the baseline and stays there at every
  later checkpoint. Accuracy uses an absolute rise (e.g. 0.1); a metric uses the same rule on
  its min-max scaled curve, so `lead_steps` = accuracy onset - metric onset (> 0: metric first).
* Half-rise step: the first checkpoint where accuracy is halfway from its post-memorization
  baseline to its maximum; groups are asynchronous when these differ.
* Correlations per group and window (all checkpoints, post-memorization, post-onset): Spearman
  and Pearson with p-values, next to the same for two trivial baselines, the checkpoint step and
  the training loss. Detrended measures: the Spearman partial correlation controlling for step
  (ranks residualized on the step's ranks) and the Spearman correlation of first differences.
  `beats_baselines`: |Spearman| at least both baselines' and |partial| above the training loss'
  partial with p < 0.05 -- a metric that is only a function of step never passes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from moegrok.memorization import MEMORIZED_ACCURACY, memorization_steps

# +1: expected to rise as a group generalizes, -1: to fall (orientation for onsets only)
DIRECTIONS = {
    "pathway_distance": -1, "pathway_distance_chars": -1, "pathway_distance_norm": -1, "pathway_length": -1,
    "mean_cos": 1, "mean_cos_median": 1, "consistency": 1, "consistency_median": 1,
    "med": -1, "loss_mean": -1, "loss_median": -1, "step": 1,
    "router_saturation": 1, "top1_agreement": 1,
}
BASELINES = ("step", "loss_mean")
NON_METRICS = {"checkpoint", "step", "group", "sample_set", "num_samples", "num_pairs", "pairs", "num_memorized",
               "loss_std", "loss_p90", "train_accuracy"}
WINDOWS = ("all", "post_memorization", "post_onset")


def metric_columns(metrics: pd.DataFrame) -> list[str]:
    """Scalar metric columns of a metrics table (baselines excluded)."""
    return [c for c in metrics.columns if c not in NON_METRICS and c not in BASELINES
            and pd.api.types.is_numeric_dtype(metrics[c])]


def direction(metric: str) -> int:
    base = metric.split("_answer")[0]
    return DIRECTIONS.get(base, DIRECTIONS.get(metric, 0))


def onset(steps: np.ndarray, values: np.ndarray, *, start_step: float, min_rise: float,
          scaled: bool) -> float:
    """The sustained-rise onset of an oriented curve (NaN if it never rises that way)."""
    order = np.argsort(steps)
    steps, values = steps[order], values[order]
    keep = (steps >= start_step) & np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if len(values) < 2:
        return float("nan")
    if scaled:
        span = values.max() - values.min()
        if span <= 0:
            return float("nan")
        values = (values - values.min()) / span
    above = values >= values[0] + min_rise
    sustained = np.flip(np.logical_and.accumulate(np.flip(above)))  # above here and at every later point
    if not sustained.any():
        return float("nan")
    first = int(np.argmax(sustained))
    return float(steps[max(first - 1, 0)])


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    result = stats.spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def _pearson(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    result = stats.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


def partial_spearman(x: np.ndarray, y: np.ndarray, control: np.ndarray) -> tuple[float, float]:
    """Spearman correlation of x and y with `control` partialled out (on ranks)."""
    if len(x) < 4:
        return float("nan"), float("nan")
    rx, ry, rc = (stats.rankdata(v) for v in (x, y, control))
    design = np.column_stack([np.ones_like(rc), rc])
    residual_x = rx - design @ np.linalg.lstsq(design, rx, rcond=None)[0]
    residual_y = ry - design @ np.linalg.lstsq(design, ry, rcond=None)[0]
    if np.allclose(residual_x, 0, atol=1e-9) or np.allclose(residual_y, 0, atol=1e-9):
        return 0.0, 1.0
    r = float(np.corrcoef(residual_x, residual_y)[0, 1])
    dof = len(x) - 3
    t = r * np.sqrt(dof / max(1 - r * r, 1e-12))
    return r, float(2 * stats.t.sf(abs(t), dof))


def correlate(curve: pd.DataFrame, metric: str) -> dict:
    """All correlation measures of one metric with accuracy over the rows of `curve`
    (columns step, accuracy, the metric, loss_mean), sorted by step."""
    curve = curve.sort_values("step").dropna(subset=[metric, "accuracy"])
    x, y, step = (curve[c].to_numpy(dtype=float) for c in (metric, "accuracy", "step"))
    spearman, spearman_p = _spearman(x, y)
    pearson, pearson_p = _pearson(x, y)
    partial, partial_p = partial_spearman(x, y, step)
    diff = _spearman(np.diff(x), np.diff(y))[0] if len(x) >= 4 else float("nan")
    return {"n": len(x), "spearman": spearman, "spearman_p": spearman_p, "pearson": pearson,
            "pearson_p": pearson_p, "partial_spearman": partial, "partial_p": partial_p, "diff_spearman": diff}


def join_accuracy(metrics: pd.DataFrame, accuracy: pd.DataFrame, *, sample_set: str,
                  group_map: dict[str, str]) -> pd.DataFrame:
    """Metrics of `sample_set` joined with accuracy of the mapped benchmark group, per checkpoint."""
    chosen = metrics[metrics["sample_set"] == sample_set].copy()
    chosen["benchmark_group"] = chosen["group"].map(lambda g: group_map.get(g, g))
    acc = accuracy.rename(columns={"group": "benchmark_group"})
    if "tuned" in acc:  # tuned accuracy is its own benchmark column, on the base checkpoint's metrics
        acc = acc.assign(benchmark=acc["benchmark"].where(~acc["tuned"].astype(bool), acc["benchmark"] + "+tuned"),
                         checkpoint=acc["base_checkpoint"])
    acc = acc[["checkpoint", "benchmark", "benchmark_group", "accuracy"]]
    return chosen.merge(acc, on=["checkpoint", "benchmark_group"], how="inner")


def analyze(metrics: pd.DataFrame, accuracy: pd.DataFrame, memorized: pd.DataFrame, *,
            sample_set: str = "memorized", group_map: dict[str, str] | None = None,
            min_rise: float = 0.1, memorized_accuracy: float = MEMORIZED_ACCURACY) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(correlations, onsets) tables."""
    joined = join_accuracy(metrics, accuracy, sample_set=sample_set, group_map=group_map or {})
    mem_steps = memorization_steps(metrics, memorized, memorized_accuracy=memorized_accuracy)
    columns = metric_columns(metrics)
    onset_rows, corr_rows = [], []
    for (group, benchmark), curve in joined.groupby(["group", "benchmark"], sort=True):
        curve = curve.sort_values("step")
        mem_step, mem_rule = mem_steps.get(group, (float(curve["step"].min()), "first_checkpoint"))
        acc_onset = onset(curve["step"].to_numpy(float), curve["accuracy"].to_numpy(float), start_step=mem_step,
                          min_rise=min_rise, scaled=False)
        final = float(curve["accuracy"].iloc[-1])
        after = curve[curve["step"] >= mem_step]
        half_step = float("nan")
        if np.isfinite(acc_onset) and len(after):
            halfway = after["accuracy"].iloc[0] + 0.5 * (after["accuracy"].max() - after["accuracy"].iloc[0])
            half_step = float(after.loc[after["accuracy"] >= halfway, "step"].iloc[0])
        onset_rows.append({"group": group, "benchmark": benchmark, "memorization_step": mem_step,
                           "memorization_rule": mem_rule,
                           "generalization_onset": acc_onset, "lag_steps": acc_onset - mem_step,
                           "half_rise_step": half_step,
                           "accuracy_at_memorization": float(np.interp(mem_step, curve["step"], curve["accuracy"])),
                           "final_accuracy": final, "max_accuracy": float(curve["accuracy"].max())})
        windows = {"all": curve, "post_memorization": curve[curve["step"] >= mem_step],
                   "post_onset": curve[curve["step"] >= acc_onset] if np.isfinite(acc_onset) else curve.iloc[:0]}
        for window, rows in windows.items():
            base = {b: correlate(rows, b) for b in BASELINES}
            for metric in [*columns, *BASELINES]:
                if curve[metric].isna().all():
                    continue
                corr = base[metric] if metric in BASELINES else correlate(rows, metric)
                sign = direction(metric) or (np.sign(corr["spearman"]) if np.isfinite(corr["spearman"]) else 1)
                metric_onset = onset(rows["step"].to_numpy(float), sign * rows[metric].to_numpy(float),
                                     start_step=mem_step, min_rise=min_rise, scaled=True)
                corr_rows.append({
                    "group": group, "benchmark": benchmark, "sample_set": sample_set, "window": window,
                    "metric": metric, "is_baseline": metric in BASELINES, **corr,
                    "step_spearman": base["step"]["spearman"], "loss_spearman": base["loss_mean"]["spearman"],
                    "loss_partial_spearman": base["loss_mean"]["partial_spearman"],
                    "onset_step": metric_onset, "lead_steps": acc_onset - metric_onset,
                    "beats_baselines": metric not in BASELINES and beats_baselines(corr, base),
                })
    return pd.DataFrame(corr_rows), pd.DataFrame(onset_rows)


def beats_baselines(corr: dict, base: dict[str, dict]) -> bool:
    """|Spearman| >= both baselines' and a detrended (partial) correlation stronger than the
    training loss' and significant. NaN anywhere counts as not beating."""
    rho = abs(corr["spearman"])
    strongest = max(abs(base[b]["spearman"]) if np.isfinite(base[b]["spearman"]) else 0.0 for b in BASELINES)
    partial, loss_partial = abs(corr["partial_spearman"]), abs(base["loss_mean"]["partial_spearman"])
    if not (np.isfinite(rho) and np.isfinite(partial)):
        return False
    loss_partial = loss_partial if np.isfinite(loss_partial) else 0.0
    return bool(rho >= strongest and partial > loss_partial and corr["partial_p"] < 0.05)


def asynchronous_groups(onsets: pd.DataFrame) -> bool:
    """Whether the groups that generalize get halfway up their rise at different checkpoints."""
    return onsets["half_rise_step"].dropna().nunique() > 1
