"""The study's small result tables (CSV, committed under docs/findings/) and the Markdown rendered
from them, so every figure in the Findings traces to a row and the Findings re-render without
re-training: `python jobs/study.py render_only=true findings_dir=docs/findings`.

Tables: zoos.csv (one row per zoo), groups.csv (one per group: status, onsets, scored or why
not), main.csv (headline rows and baselines, every split, at `detector.miss_cost`),
comparisons.csv (each headline rule's cost difference against each baseline, interval, verdict),
sensitivity.csv (the headline differences at every miss cost), variants.csv (every variant on all
zoos, for the count and the spread of what was tried), calibrated_rules.csv (the rules a sweep's
verdicts use; copied to moegrok/analysis/calibrated_rules.csv when the study is adopted).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

BEGIN, END = "<!-- tables:begin (rendered from docs/findings/*.csv) -->", "<!-- tables:end -->"
ZOO_COLUMNS = ["zoo", "setting", "seed", "overrides", "collapse", "min_train_acc", "train_s", "sweep_s"]
GROUP_COLUMNS = ["zoo", "family", "group", "status", "memorization_step", "accuracy_at_memorization",
                 "accuracy_onset", "final_accuracy", "scored", "excluded"]
COUNT_COLUMNS = ["groups", "grokking", "negatives", "detected", "misses", "false_alarms", "leads", "median_lead",
                 "onset_mae", "mean_delay"]
MAIN_COLUMNS = ["split", "detector", "form", "knowledge", *COUNT_COLUMNS, "cost", "cost_low", "cost_high",
                "rules_chosen"]
COMPARISON_COLUMNS = ["split", "miss_cost", "detector", "form", "baseline", "difference", "diff_low", "diff_high",
                      "verdict"]


def findings_tables(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The committed tables from the study's full tables."""
    detector, compared = tables["detector"], tables["comparisons"]
    main = detector[detector["headline"] | (detector["form"] == "baseline")]
    sensitivity = tables["sensitivity_comparisons"]
    groups = tables["groups_scored"]
    return {
        "zoos": tables["zoos"][[c for c in ZOO_COLUMNS if c in tables["zoos"]]],
        "groups": groups[[c for c in GROUP_COLUMNS if c in groups]],
        "main": main[MAIN_COLUMNS],
        "comparisons": compared[compared["headline"]][COMPARISON_COLUMNS] if len(compared) else compared,
        "sensitivity": sensitivity[COMPARISON_COLUMNS] if len(sensitivity) else sensitivity,
        "variants": detector[(detector["split"] == "all") & (detector["form"] != "baseline")]
        .sort_values("cost")[["detector", "form", "headline", "knowledge", *COUNT_COLUMNS, "cost", "cost_low",
                              "cost_high", "variants_tried"]],
        "calibrated_rules": tables["calibrated_rules"],
    }


def write_findings(tables: dict[str, pd.DataFrame], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, frame in findings_tables(tables).items():
        path = directory / f"{name}.csv"
        frame.to_csv(path, index=False, float_format="%.4g")
        paths.append(path)
    return paths


def read_findings(directory: Path) -> dict[str, pd.DataFrame]:
    return {path.stem: pd.read_csv(path) for path in sorted(directory.glob("*.csv"))}


def _md(frame: pd.DataFrame) -> str:
    """A Markdown table (no dependency on tabulate)."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if pd.isna(value) else f"{value:.0f}" if abs(value) >= 10 else f"{value:.2g}"
        return str(value).replace("|", "/")

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _interval(mean: float, low: float, high: float) -> str:
    return f"{mean:.0f} [{low:.0f}, {high:.0f}]"


SHORT = {"step only": "step only", "training-loss spike": "loss spike", "always silent": "silent",
         "loss_mean": "training loss (same rule, form)"}


WORD = {"better than": "**better**", "worse than": "**worse**", "no evidence either way": "no evidence"}


def _short(baseline: str) -> str:
    return next((short for key, short in SHORT.items() if baseline.startswith(key)), baseline)


def comparison_grid(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (detector, form), one column per baseline: "difference [low, high] verdict"."""
    cells = rows.assign(baseline=rows["baseline"].map(_short), cell=[
        f"{_interval(d, lo, hi)} {WORD[v]}" for d, lo, hi, v in zip(rows["difference"], rows["diff_low"],
                                                               rows["diff_high"], rows["verdict"], strict=True)])
    grid = cells.pivot_table(index=["detector", "form"], columns="baseline", values="cell", aggfunc="first")
    return grid.reset_index()


def render_tables(found: dict[str, pd.DataFrame]) -> str:
    """The Findings' tables, from the committed CSVs."""
    zoos, groups, main = found["zoos"], found["groups"], found["main"]
    status = groups.groupby(["family", "status"]).size().unstack(fill_value=0).reset_index()
    scored = groups.assign(excluded=groups["excluded"].fillna("scored")).groupby("excluded").size()
    parts = [f"{len(zoos)} zoos; groups by family and status (held-out accuracy):", "", _md(status), "",
             "Scored groups and why the others are not: " + ", ".join(f"{k}: {v}" for k, v in scored.items()) + ".",
             ""]
    for split, rows in main.groupby("split", sort=False):
        shown = rows.assign(cost=[_interval(*v) for v in zip(rows["cost"], rows["cost_low"], rows["cost_high"],
                                                              strict=True)])
        parts += [f"**{split}** (cost: mean steps per scored group [95% bootstrap interval over groups]; "
                  "every rule told only never to fire in the canary):", "",
                  _md(shown[["detector", "form", "grokking", "negatives", "detected", "false_alarms", "leads",
                             "onset_mae", "mean_delay", "cost"]]), ""]
    compared = found["comparisons"]
    for split, rows in (compared.groupby("split", sort=False) if len(compared) else ()):
        parts += [f"**{split}**: cost difference, rule - baseline (negative: the rule is cheaper) "
                  "[95% interval] and verdict:", "", _md(comparison_grid(rows)), ""]
    sensitivity = found.get("sensitivity")
    if sensitivity is not None and len(sensitivity):
        counts = (sensitivity[sensitivity["split"] == "all"].groupby(["miss_cost", "verdict"]).size()
                  .unstack(fill_value=0).reset_index())
        parts += ["Miss-cost sensitivity (split all; headline rule x baseline pairs by verdict):", "", _md(counts), ""]
    variants = found.get("variants")
    if variants is not None and len(variants):
        parts += [f"Variants tried (metric x form): {int(variants['variants_tried'].iloc[0])}. The five cheapest on "
                  "all zoos (chosen after the fact, so not a finding):", "",
                  _md(variants.head(5)[["detector", "form", "detected", "grokking", "false_alarms", "negatives"]]
                      .assign(cost=[_interval(*v) for v in zip(variants["cost"].head(5), variants["cost_low"].head(5),
                                                                variants["cost_high"].head(5), strict=True)])), ""]
    return "\n".join(parts)


def render_into(markdown: Path, directory: Path) -> None:
    """Replace the tables between the markers of `markdown` with those rendered from `directory`."""
    text = markdown.read_text()
    rendered = f"{BEGIN}\n{render_tables(read_findings(directory))}\n{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: rendered, text, flags=re.S)
    else:
        text = f"{text.rstrip()}\n\n{rendered}\n"
    markdown.write_text(text)
