"""study.html: the study's stored tables as a page (read-only over the tables study.py writes)."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from moegrok.analysis.calibration import LOSS_SPIKE, SILENT, headline_form
from moegrok.config import StudyConfig
from moegrok.report.pages import page, png, table

SHOWN = ["detector", "form", "rule", "grokking_groups", "detected", "misses", "onset_mae", "onset_bias",
         "mean_delay", "negative_groups", "false_alarms", "never_zoos_with_alarm", "cost", "beats_step",
         "beats_training_loss", "beats_loss_spike", "beats_silence", "beats_all_baselines"]
STATUS_COLOURS = {"grokking": "C0", "never": "C3", "no_lag": "C2"}


def detector_table(detector: pd.DataFrame, split: str, *, form: str) -> pd.DataFrame:
    """The rows of one split: the headline form's detectors, then the baselines."""
    rows = detector[(detector["split"] == split) & (detector["form"].isin([form, "baseline"]))]
    return rows.sort_values(["form", "cost"], key=lambda c: c.map({"baseline": 1}).fillna(0) if c.name == "form"
                            else c)[SHOWN]


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
    detector, groups = tables["detector"], tables["groups"]
    variants = detector[detector["form"] != "baseline"][["detector", "form"]].drop_duplicates()
    parts = ["<h1>moegrok study: detecting grokking from training samples alone</h1>",
             "<h2>Zoos</h2><p>Calibration zoos fit the detectors' free parameters; evaluation zoos are never used "
             "for that. collapse: a grokking group's train accuracy fell below 0.95 between its memorization and "
             "held-out accuracy 0.9.</p>", table(tables["zoos"]),
             "<h2>Groups (ground truth from held-out accuracy)</h2>",
             table(groups[["zoo", "role", "group", "memorization_step", "accuracy_at_memorization",
                           "generalization_onset", "final_accuracy", "status", "collapse"]])]
    parts.append(f"<h2>Detector vs baselines (headline form: {html.escape(form)})</h2><p>Rule: z >= threshold at "
                 "persistence consecutive checkpoints after memorization; onset = the checkpoint before. Costs: mean "
                 f"per group of |onset error| (steps), {cfg.detector.miss_cost:g} per miss or false alarm; a detector "
                 f"beats a baseline when its cost is lower by at least {cfg.detector.margin:g}. Baselines: three "
                 "step-only rules (the calibration zoos' mean accuracy onset; a calibrated constant onset; a "
                 "calibrated lag after memorization; beats_step compares with the best of them on each split), "
                 f"the <b>training loss</b> under the same rule and form (row loss_mean), <b>{LOSS_SPIKE}</b>, and "
                 f"<b>{SILENT}</b>. {len(variants)} detector variants (metric x form) were evaluated; the tables "
                 "show the headline form, then every variant.</p>")
    for split in ("evaluation: all", "evaluation: collapse", "evaluation: no collapse", "calibration (in-sample)"):
        shown = detector_table(detector, split, form=form)
        if len(shown):
            parts.append(f"<h3>{html.escape(split)}</h3>" + table(shown))
    parts.append("<h3>Every variant, evaluation zoos</h3>"
                 + table(detector[detector["split"] == "evaluation: all"].sort_values("cost")[SHOWN]))
    summary = tables["contrast_summary"]
    parts.append("<h2>Between-group contrast at the last checkpoint</h2><p>Counts of groups whose 95% bootstrap "
                 "interval lies on the declared side of 0, covers it, or lies against it, by ground-truth status "
                 f"(contrast form: {html.escape(form)}).</p>" + table(contrast_counts(summary)))
    contrast = tables["contrast"]
    primary = contrast[(contrast["mode"] == form) & contrast["z"].notna()]
    for metric, rows in primary.groupby("metric", sort=True):
        parts.append(png(_contrast_figure(metric, rows, groups), out / "figures" / f"study_contrast_{metric}.png"))
    study = tables.get("study")
    if study is not None and len(study):
        stars = study.groupby(["metric", "retrospective"]).agg(
            groups=("group", "size"), mean_spearman=("spearman", "mean"), mean_partial=("partial_spearman", "mean"),
            stars=("beats_baselines", "sum")).reset_index()
        parts.append("<h2>Per-group correlations after memorization (kept; flagged and corrected)</h2><p>Within one "
                     "run the step is shared by every group, so these cannot separate a metric from time; stars "
                     "follow the run report's rule (Benjamini-Hochberg per zoo, declared sign, monitors only).</p>"
                     + table(stars))
    path = out / "study.html"
    path.write_text(page("moegrok study", parts))
    return path


def headline_summary(tables: dict[str, pd.DataFrame], *, cfg: StudyConfig) -> str:
    """Plain text for the console: the zoos, the detector against the baselines per evaluation split
    (headline form), and the contrast counts."""
    form = headline_form(cfg.control)
    columns = ["detector", "rule", "detected", "grokking_groups", "onset_mae", "mean_delay", "misses",
               "false_alarms", "negative_groups", "cost", "beats_all_baselines"]
    lines = ["zoos:", tables["zoos"][["zoo", "role", "collapse", "min_train_acc", "train_s", "sweep_s"]].to_string(
        index=False, float_format=lambda x: f"{x:.2f}")]
    for split in ("evaluation: collapse", "evaluation: no collapse", "evaluation: all"):
        shown = detector_table(tables["detector"], split, form=form)
        if len(shown):
            lines += [f"\ndetector ({form}) vs baselines, {split}:",
                      shown[columns].to_string(index=False, float_format=lambda x: f"{x:.0f}")]
    lines += ["\ncontrast at the last checkpoint (groups by status):",
              contrast_counts(tables["contrast_summary"]).to_string(index=False)]
    return "\n".join(lines)
