"""study.html: the study's stored tables as a page (read-only over the tables study.py writes)."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from moegrok.analysis.calibration import LOSS_SPIKE, SILENT, STEP_MEAN, headline_form
from moegrok.config import StudyConfig
from moegrok.report.pages import page, png, table

SHOWN = ["split", "detector", "form", "knowledge", "grokking", "negatives", "detected", "misses", "false_alarms",
         "leads", "median_lead", "onset_mae", "mean_delay", "cost", "cost_low", "cost_high", "rules_chosen"]
STATUS_COLOURS = {"grokking": "C0", "never": "C3", "no_lag": "C2"}


def detector_table(detector: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of one split: the headline rows, then the baselines."""
    rows = detector[(detector["split"] == split) & (detector["headline"] | (detector["form"] == "baseline"))]
    return rows.sort_values(["headline", "cost"], ascending=[False, True])[SHOWN]


def contrast_counts(summary: pd.DataFrame) -> pd.DataFrame:
    """Per metric: how many groups' last-checkpoint contrast lies on the declared side of 0, by status."""
    counts = summary.groupby(["metric", "status", "verdict"]).size().unstack("verdict", fill_value=0)
    counts = counts.reindex(columns=["as declared", "covers 0", "against"], fill_value=0)
    return counts.reset_index()


def _contrast_figure(metric: str, contrast: pd.DataFrame, groups: pd.DataFrame):
    fig = Figure(figsize=(6.5, 3))
    ax = fig.subplots()
    merged = contrast.merge(groups[["zoo", "group", "status"]], on=["zoo", "group"])
    for _, part in merged.groupby(["zoo", "group"]):
        status = part["status"].iloc[0]
        ax.plot(part["step"], part["z"], color=STATUS_COLOURS.get(status, "gray"), lw=1, alpha=0.7)
    for status, colour in STATUS_COLOURS.items():
        ax.plot([], [], color=colour, label=status)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_title(f"{metric}: contrast z (declared direction up), every zoo's groups", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_study_report(tables: dict[str, pd.DataFrame], out: Path, *, cfg: StudyConfig) -> Path:
    form = headline_form(cfg.control)
    detector, groups = tables["detector"], tables["groups_scored"]
    parts = ["<h1>moegrok study: detecting grokking from training samples alone</h1>",
             "<h2>Zoos</h2><p>Every zoo is scored with the rules calibrated on all the other zoos. collapse: a "
             "grokking group's train accuracy fell below 0.95 between its memorization and held-out accuracy "
             "0.9.</p>", table(tables["zoos"]),
             "<h2>Groups (ground truth from held-out accuracy)</h2>", table(groups),
             f"<h2>Detectors vs baselines (miss cost {cfg.detector.miss_cost:g})</h2><p>Rule: z >= threshold at "
             "persistence consecutive checkpoints after memorization; onset = the checkpoint before. Cost per "
             "scored group: |onset error| + delay after the accuracy onset (at most the miss cost), the miss cost "
             "per miss or false alarm; intervals: bootstrap over scored groups. Every rule and baseline is told "
             f"only never to fire in the canary. Baselines: <b>{STEP_MEAN}</b>, the <b>training loss</b> under the "
             f"same rule and form (loss_mean), <b>{LOSS_SPIKE}</b>, <b>{SILENT}</b>. "
             f"{int(detector['variants_tried'].iloc[0])} variants (metric x form) were tried.</p>"]
    for split in detector["split"].unique():
        parts.append(f"<h3>{html.escape(split)}</h3>" + table(detector_table(detector, split)))
    compared = tables["comparisons"]
    if len(compared):
        parts.append("<h3>Headline cost differences against every baseline</h3>"
                     + table(compared[compared["headline"]]))
    parts.append("<h3>Miss-cost sensitivity (headline rows)</h3>" + table(tables["sensitivity_comparisons"]))
    parts.append("<h3>Every variant, all zoos</h3>"
                 + table(detector[detector["split"] == "all"].sort_values("cost")[SHOWN]))
    summary = tables["contrast_summary"]
    parts.append("<h2>Between-group contrast at the last checkpoint</h2><p>Counts of groups whose 95% bootstrap "
                 "interval lies on the declared side of 0, covers it, or lies against it, by ground-truth status "
                 f"(contrast form: {html.escape(form)}).</p>" + table(contrast_counts(summary)))
    contrast = tables["contrast"]
    primary = contrast[(contrast["mode"] == ("control" if cfg.control else "others")) & contrast["z"].notna()]
    for metric, rows in primary.groupby("metric", sort=True):
        parts.append(png(_contrast_figure(metric, rows, groups), out / "figures" / f"study_contrast_{metric}.png"))
    study = tables.get("study")
    if study is not None and len(study):
        stars = study.groupby(["metric", "retrospective"]).agg(
            groups=("group", "size"), mean_spearman=("spearman", "mean"), mean_partial=("partial_spearman", "mean"),
            stars=("beats_baselines", "sum")).reset_index()
        parts.append("<h2>Per-group correlations after memorization (kept; flagged and corrected)</h2><p>Within one "
                     "run the step is shared by every group, so these cannot separate a metric from time.</p>"
                     + table(stars))
    path = out / "study.html"
    path.write_text(page("moegrok study", parts))
    return path


def headline_summary(tables: dict[str, pd.DataFrame], *, cfg: StudyConfig) -> str:
    """Plain text for the console: the zoos, the headline rows and baselines per split, and each
    headline rule's verdict against each baseline."""
    columns = ["detector", "form", "detected", "grokking", "false_alarms", "negatives", "leads", "cost", "cost_low",
               "cost_high"]
    lines = ["zoos:", tables["zoos"][["zoo", "collapse", "min_train_acc", "train_s", "sweep_s"]].to_string(
        index=False, float_format=lambda x: f"{x:.2f}")]
    for split in tables["detector"]["split"].unique():
        shown = detector_table(tables["detector"], split)
        lines += [f"\nheadline rows and baselines, {split} (every rule told only: never fire in the canary):",
                  shown[columns].to_string(index=False, float_format=lambda x: f"{x:.0f}")]
    compared = tables["comparisons"]
    if len(compared):
        lines += ["\nverdicts (rule - baseline cost, 95% interval):",
                  compared[compared["headline"]][["split", "detector", "form", "baseline", "difference", "diff_low",
                                                  "diff_high", "verdict"]].to_string(
                      index=False, float_format=lambda x: f"{x:.0f}")]
    return "\n".join(lines)
