"""Page parts for the between-group contrast: a summary table and one figure per metric (each group's
change since memorization beside the control's, and the difference in differences with its
bootstrap interval). Read-only over contrast.parquet (and onsets.parquet for the accuracy onsets)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moegrok.analysis.contrast import contrast_summary
from moegrok.report.pages import png, table

INTRO = ("<p>Per group, the change of each metric since the group memorized, minus the same change of the "
         "reference: the control group (a group known not to generalize), or the other groups' mean for the "
         "control itself and when no control is set. Within one run the step is the same for every group, so only "
         "such a contrast separates a metric's signal from time. 95% intervals: paired bootstrap over samples. "
         "Training-side data only (a monitor); held-out accuracy appears only as the dashed onset lines.</p>")
RULES = {"train_accuracy": "the first checkpoint whose train accuracy reached analysis.memorized_accuracy",
         "first_checkpoint": "the first checkpoint: its train accuracy never reached analysis.memorized_accuracy"}


def starts(contrast: pd.DataFrame) -> str:
    """Where each group's contrast starts, and by which rule (one line per group)."""
    rows = contrast.drop_duplicates("group").sort_values("group")
    lines = [f"{html.escape(str(row.group))}: step {row.memorization_step:g} "
             f"({RULES.get(getattr(row, 'memorization_rule', ''), 'memorization')})"
             for row in rows.itertuples(index=False)]
    return "<p>Start of each group's change (its memorization step): " + "; ".join(lines) + ".</p>"


def primary_mode(contrast: pd.DataFrame) -> str:
    return "control" if (contrast["mode"] == "control").any() else "others"


def _figure(metric: str, rows: pd.DataFrame, onsets: pd.DataFrame | None):
    fig = Figure(figsize=(9, 2.9))
    left, right = fig.subplots(1, 2)
    for index, (group, part) in enumerate(rows.groupby("group", sort=True)):
        part = part.sort_values("step")
        colour = f"C{index}"
        is_control = (part["reference"] == "others").all() and (rows["reference"] != "others").any()
        label = f"{group} (control)" if is_control else group
        left.plot(part["step"], part["change"], color="black" if is_control else colour,
                  ls="--" if is_control else "-", marker="o", ms=2, label=label)
        if is_control:
            continue
        right.plot(part["step"], part["did"], color=colour, marker="o", ms=2,
                   label=f"{group} - {part['reference'].iloc[0]}")
        right.fill_between(part["step"], part["ci_low"], part["ci_high"], color=colour, alpha=0.2, lw=0)
        if onsets is not None:
            match = onsets.loc[onsets["group"] == group, "generalization_onset"].dropna()
            for ax in (left, right):
                for value in match:
                    ax.axvline(value, color=colour, ls=":", lw=1)
    right.axhline(0.0, color="gray", lw=0.8)
    sign = int(rows["direction"].iloc[0])
    left.set_title(f"{metric}: change since memorization", fontsize=9)
    right.set_title(f"difference in differences ({'up' if sign > 0 else 'down'} = as declared)", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def contrast_section(contrast: pd.DataFrame | None, onsets: pd.DataFrame | None, figures: Path) -> list[str]:
    """The report's contrast section; empty without a contrast table."""
    if contrast is None or contrast.empty:
        return []
    mode = primary_mode(contrast)
    chosen = contrast[contrast["mode"] == mode]
    parts = ["<h2>Between-group contrast (monitor)</h2>", INTRO, starts(chosen)]
    summary = contrast_summary(chosen)
    if len(summary):
        parts.append("<h3>At the last checkpoint</h3><p>verdict: the 95% interval lies on the declared side of 0 "
                     "(as declared), on the other side (against), or covers 0.</p>" + table(summary))
    for metric, rows in chosen.dropna(subset=["did"]).groupby("metric", sort=True):
        if rows["direction"].iloc[0] == 0:
            continue
        parts.append(f"<h3>{html.escape(metric)}</h3>")
        parts.append(png(_figure(metric, rows, onsets), figures / f"contrast_{metric}.png"))
    med = contrast[contrast["metric"] == "med"]
    if len(med):
        parts.append("<p>MED is one number for the whole model (one embedding table), so it has no between-group "
                     f"contrast; its change since the first memorization: {np.nanmax(med['change'].abs()):.3g} "
                     "at most.</p>")
    return parts
