"""Does a training-sample metric track generalization? Onsets, correlations, trivial baselines.

Reads only stored tables (metrics.parquet, accuracy.parquet, memorized.parquet).

Rules (docs/analysis.md documents them):
* Memorization step of a group: `moegrok.memorization.memorization_steps` (train accuracy, else
  the loss rule).
* Accuracy onsets and a group's status (grokking, never, no lag): moegrok/analysis/onsets.py.
* Correlations per group and window (all checkpoints, post-memorization, post-onset): Spearman
  and Pearson with p-values, next to the same for two trivial baselines, the checkpoint step and
  the training loss. Detrended measures: the Spearman partial correlation controlling for step
  (ranks residualized on the step's ranks) and the Spearman correlation of first differences.
  Nothing is computed from fewer than `min_n` checkpoints (8).
* `beats_baselines` (a star): a monitor (moegrok/metrics/declarations.py) with a declared direction, in a
  group whose accuracy rises (it has an onset), whose Spearman has the declared sign, |Spearman|
  at least both baselines', |partial| above the training loss' partial, and a partial p-value that
  survives Benjamini-Hochberg at `alpha` (0.05) over every row judged in one call (all groups,
  windows and metrics that meet the other conditions' preconditions: a monitor with a declared
  direction, in a rising group, with a partial p-value). A metric that is only a function of step
  never passes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from moegrok.analysis.onsets import accuracy_onsets
from moegrok.metrics.declarations import direction, is_retrospective
from moegrok.metrics.memorization import MEMORIZED_ACCURACY, memorization_steps

BASELINES = ("step", "loss_mean")
NON_METRICS = {"checkpoint", "step", "group", "sample_set", "num_samples", "num_pairs", "pairs", "num_memorized",
               "loss_std", "loss_p90", "train_accuracy"}
WINDOWS = ("all", "post_memorization", "post_onset")
MIN_N = 8  # fewer checkpoints than this: no correlation at all
ALPHA = 0.05  # Benjamini-Hochberg false discovery rate over the rows judged


def metric_columns(metrics: pd.DataFrame) -> list[str]:
    """Scalar metric columns of a metrics table (baselines excluded)."""
    return [c for c in metrics.columns if c not in NON_METRICS and c not in BASELINES
            and pd.api.types.is_numeric_dtype(metrics[c])]


def _spearman(x: np.ndarray, y: np.ndarray, *, min_n: int = MIN_N) -> tuple[float, float]:
    if len(x) < max(min_n, 3) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    result = stats.spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def _pearson(x: np.ndarray, y: np.ndarray, *, min_n: int = MIN_N) -> tuple[float, float]:
    if len(x) < max(min_n, 3) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    result = stats.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


def partial_spearman(x: np.ndarray, y: np.ndarray, control: np.ndarray, *,
                     min_n: int = MIN_N) -> tuple[float, float]:
    """Spearman correlation of x and y with `control` partialled out (on ranks)."""
    if len(x) < max(min_n, 4):
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


def correlate(curve: pd.DataFrame, metric: str, *, min_n: int = MIN_N) -> dict:
    """All correlation measures of one metric with accuracy over the rows of `curve`
    (columns step, accuracy, the metric, loss_mean), sorted by step; NaN below `min_n` rows."""
    curve = curve.sort_values("step").dropna(subset=[metric, "accuracy"])
    x, y, step = (curve[c].to_numpy(dtype=float) for c in (metric, "accuracy", "step"))
    spearman, spearman_p = _spearman(x, y, min_n=min_n)
    pearson, pearson_p = _pearson(x, y, min_n=min_n)
    partial, partial_p = partial_spearman(x, y, step, min_n=min_n)
    diff = _spearman(np.diff(x), np.diff(y), min_n=min_n - 1)[0] if len(x) >= min_n else float("nan")
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
            sample_set: str = "all", group_map: dict[str, str] | None = None,
            min_rise: float = 0.1, memorized_accuracy: float = MEMORIZED_ACCURACY, min_n: int = MIN_N,
            alpha: float = ALPHA) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(correlations, onsets) tables."""
    joined = join_accuracy(metrics, accuracy, sample_set=sample_set, group_map=group_map or {})
    mem_steps = memorization_steps(metrics, memorized, memorized_accuracy=memorized_accuracy)
    onsets = accuracy_onsets(joined, mem_steps, min_rise=min_rise)
    columns = metric_columns(metrics)
    corr_rows = []
    for row in onsets.itertuples(index=False):
        curve = joined[(joined["group"] == row.group) & (joined["benchmark"] == row.benchmark)].sort_values("step")
        acc_onset, mem_step = row.generalization_onset, row.memorization_step
        windows = {"all": curve, "post_memorization": curve[curve["step"] >= mem_step],
                   "post_onset": curve[curve["step"] >= acc_onset] if np.isfinite(acc_onset) else curve.iloc[:0]}
        for window, rows in windows.items():
            base = {b: correlate(rows, b, min_n=min_n) for b in BASELINES}
            for metric in [*columns, *BASELINES]:
                if curve[metric].isna().all():
                    continue
                corr = base[metric] if metric in BASELINES else correlate(rows, metric, min_n=min_n)
                corr_rows.append({
                    "group": row.group, "benchmark": row.benchmark, "sample_set": sample_set, "window": window,
                    "metric": metric, "is_baseline": metric in BASELINES, "direction": direction(metric),
                    "retrospective": is_retrospective(metric, sample_set),
                    "generalizing": bool(np.isfinite(acc_onset)),
                    **corr, "step_spearman": base["step"]["spearman"], "loss_spearman": base["loss_mean"]["spearman"],
                    "loss_partial_spearman": base["loss_mean"]["partial_spearman"],
                    "raw_beats": metric not in BASELINES and beats_baselines(corr, base),
                })
    return judge(pd.DataFrame(corr_rows), alpha=alpha), onsets


def judge(correlations: pd.DataFrame, *, alpha: float = ALPHA) -> pd.DataFrame:
    """Add `judged`, `sign_as_declared`, `partial_q` (Benjamini-Hochberg over the judged rows) and
    the final `beats_baselines` (the module docstring's rule)."""
    if correlations.empty:
        return correlations.assign(judged=[], sign_as_declared=[], partial_q=[], beats_baselines=[])
    sign = np.sign(correlations["spearman"].to_numpy(float))
    declared = correlations["direction"].to_numpy(int)
    sign_ok = (declared != 0) & (sign == declared)
    judged = (~correlations["is_baseline"] & ~correlations["retrospective"] & (declared != 0)
              & correlations["generalizing"] & correlations["partial_p"].notna()).to_numpy()
    q = np.full(len(correlations), np.nan)
    if judged.any():
        q[judged] = stats.false_discovery_control(correlations.loc[judged, "partial_p"].to_numpy(float), method="bh")
    beats = judged & sign_ok & correlations["raw_beats"].to_numpy(bool) & (np.nan_to_num(q, nan=1.0) < alpha)
    return correlations.assign(judged=judged, sign_as_declared=sign_ok, partial_q=q, beats_baselines=beats)


def beats_baselines(corr: dict, base: dict[str, dict]) -> bool:
    """The raw part of the rule: |Spearman| >= both baselines' and a detrended (partial)
    correlation stronger than the training loss' with p < 0.05 before correction. NaN anywhere
    counts as not beating."""
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
