"""HTML report and PNG figures from a run directory's stored tables (read-only: nothing is
recomputed, so it can be re-run at will)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from moegrok.analysis.correlations import ALPHA, MIN_N, asynchronous_groups, join_accuracy
from moegrok.metrics.declarations import RETROSPECTIVE
from moegrok.report.contrast import contrast_section
from moegrok.report.pages import page, png, table
from moegrok.store import RunDir, as_path, read_parquet, read_tags, write_text

# Paper Table 1 (Pearson/Spearman with test accuracy after the sustained rise)
PAPER_VALUES = {"pathway_distance": "-0.93 .. -0.98", "consistency": "+0.92 .. +0.99", "loss_mean": "-0.07 .. +0.79"}
CURVE_METRICS = ["pathway_distance", "pathway_distance_answer", "mean_cos", "consistency", "med", "loss_mean"]
SUMMARY_WINDOW = "post_memorization"
REPORT_VERSION = 4  # part of the report's fingerprint: raise it when the page changes


def _read(path: Path) -> pd.DataFrame | None:
    """A stored table; None when it is missing or has no rows (a stage that did not run or
    produced nothing)."""
    if not path.exists():
        return None
    frame = read_parquet(path)
    return frame if len(frame) else None


MISSING = {  # what a missing table means, and what to do
    "metrics": "no metrics.parquet: run the record and reduce stages (stage=record, stage=reduce)",
    "accuracy": "no accuracy: evaluation is off, or no benchmark item could be scored (see Failures)",
    "correlations": "no correlations or onsets: the analyze stage needs metrics and accuracy",
}


def _curves_figure(group: str, curve: pd.DataFrame, onset_row: pd.Series | None, metrics: list[str]):
    panels = ["accuracy", *metrics]
    fig = Figure(figsize=(3.1 * len(panels), 2.8))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, column in zip(axes[0], panels, strict=True):
        ax.plot(curve["step"], curve[column], marker="o", ms=3)
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if onset_row is not None:
            for key, style in (("memorization_step", ":"), ("generalization_onset", "--")):
                if np.isfinite(onset_row[key]):
                    ax.axvline(onset_row[key], color="gray", ls=style, lw=1)
    fig.suptitle(f"group {group} (dotted: memorization, dashed: generalization onset)", fontsize=10)
    fig.tight_layout()
    return fig


def _scatter_figure(group: str, curve: pd.DataFrame, correlations: pd.DataFrame, metrics: list[str]):
    fig = Figure(figsize=(3.1 * len(metrics), 2.8))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.scatter(curve[metric], curve["accuracy"], c=curve["step"], cmap="viridis", s=14)
        row = correlations[(correlations["metric"] == metric) & (correlations["window"] == "all")]
        rho = row["spearman"].iloc[0] if len(row) else float("nan")
        ax.set_title(f"{metric}\nSpearman {rho:+.2f} (all ckpts)", fontsize=8)
        ax.set_xlabel(metric, fontsize=7)
        ax.set_ylabel("accuracy", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"group {group}: metric vs accuracy (colour = step)", fontsize=10)
    fig.tight_layout()
    return fig


def _med_figure(train_log: pd.DataFrame, metrics: pd.DataFrame):
    med = metrics.groupby("step")["med"].first()
    held = train_log.groupby("step")["heldout_loss"].mean()
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    ax.plot(med.index, med.values, color="C0", marker="o", ms=3, label="MED")
    ax.set_xlabel("step")
    ax.set_ylabel("main embedding diff", color="C0")
    twin = ax.twinx()
    twin.plot(held.index, held.values, color="C3", label="held-out loss")
    twin.set_ylabel("held-out loss (mean over groups)", color="C3")
    fig.suptitle("embedding progress measure vs held-out loss", fontsize=10)
    fig.tight_layout()
    return fig


def _routing_section(run: RunDir, onsets: pd.DataFrame | None) -> list[str]:
    """The OLMoE paper's routing analyses: saturation and vocabulary specialization vs step per
    layer, co-activation heatmaps (first/middle/last layer), domain specialization per group."""
    layers = _read(run.routing_analyses)
    if layers is None or layers.empty:
        return []
    parts = ["<h2>Routing analyses (OLMoE paper)</h2><p>All groups' tokens; dashed lines: generalization "
             "onsets per group. <code>saturation</code> and <code>top1_agreement</code> are measured against the "
             "last checkpoint: <b>retrospective</b> (they need the future); <code>saturation_previous</code> and "
             "<code>top1_previous</code>, against the previous checkpoint, are their monitor forms. Co-activation "
             "and domain specialization are shown at the reference (last) checkpoint: retrospective.</p>"]
    everything = layers[layers["group"] == "*"]
    columns = [c for c in ("saturation", "top1_agreement", "saturation_previous", "top1_previous",
                           "vocab_specialization", "load_entropy") if c in everything and everything[c].notna().any()]
    fig = Figure(figsize=(3.6 * len(columns), 3))
    axes = fig.subplots(1, len(columns), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        for layer, rows in everything.groupby("layer"):
            ax.plot(rows["step"], rows[column], marker="o", ms=2, label=f"layer {layer}")
        if onsets is not None:
            for value in onsets["generalization_onset"].dropna().unique():
                ax.axvline(value, color="gray", ls="--", lw=1)
        ax.set_title(column + (" (retrospective)" if column in ("saturation", "top1_agreement") else ""),
                     fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    parts.append(png(fig, run.figures / "routing_vs_step.png"))
    coactivation = _read(run.coactivation)
    if coactivation is not None:
        shown = sorted({0, coactivation["layer"].max() // 2, coactivation["layer"].max()})
        fig = Figure(figsize=(3.6 * len(shown), 3.2), layout="constrained")  # room for the shared colour bar
        axes = fig.subplots(1, len(shown), squeeze=False)
        for ax, layer in zip(axes[0], shown, strict=True):
            matrix = coactivation[coactivation["layer"] == layer].pivot(
                index="expert_a", columns="expert_b", values="probability")
            top = matrix.max(axis=1).sort_values(ascending=False).index[:16]  # most co-activated experts
            image = ax.imshow(matrix.loc[top, top], cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(len(top)), top, fontsize=6)
            ax.set_yticks(range(len(top)), top, fontsize=6)
            ax.set_title(f"layer {layer}: P(b | a)", fontsize=9)
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
        parts.append(png(fig, run.figures / "coactivation.png"))
    specialization = _read(run.domain_specialization)
    if specialization is not None:
        groups = specialization[specialization["group"] != "*"]
        last_layer = groups["layer"].max()
        fig = Figure(figsize=(8, 3))
        ax = fig.subplots()
        rows = groups[groups["layer"] == last_layer].pivot(index="expert", columns="group", values="ratio")
        rows.plot.bar(ax=ax, width=0.8)
        ax.axhline(1.0, color="gray", lw=1)
        ax.set_title(f"domain specialization, last layer ({last_layer}), last checkpoint (1.0 = uniform)", fontsize=9)
        fig.tight_layout()
        parts.append(png(fig, run.figures / "domain_specialization.png"))
    return parts


VERDICT_METRICS = ("pathway_distance", "pathway_distance_answer", "mean_cos", "mean_cos_answer", "consistency")


def verdicts(correlations: pd.DataFrame, onsets: pd.DataFrame | None = None) -> list[str]:
    """Plain statements per group, for fixed metrics (the primary distance, the bounded and the
    paper's consistency; answer-position variants when recorded) -- never the best of many."""
    lines = []
    window = correlations[correlations["window"] == SUMMARY_WINDOW]
    generalized = {} if onsets is None else dict(zip(zip(onsets["group"], onsets["benchmark"], strict=True),
                                                     onsets["generalization_onset"].notna(), strict=True))
    for (group, benchmark), rows in window.groupby(["group", "benchmark"]):
        by_metric = rows.set_index("metric")
        if not generalized.get((group, benchmark), True):
            lines.append(f"{group} ({benchmark}): accuracy never rises {SUMMARY_WINDOW.replace('_', '-')}: "
                         "no generalization to track; its correlations are noise.")
            continue
        shown = [m for m in VERDICT_METRICS if m in by_metric.index]
        if not shown:
            continue
        first = by_metric.loc[shown[0]]
        parts = ", ".join(f"{m} {by_metric.loc[m, 'spearman']:+.2f}" for m in shown)
        beating = [m for m in shown if bool(by_metric.loc[m, "beats_baselines"])]
        lines.append(
            f"{group} ({benchmark}), n={int(first['n'])} checkpoints after memorization: Spearman {parts}; "
            f"baselines: step {first['step_spearman']:+.2f}, training loss {first['loss_spearman']:+.2f}. "
            f"Beats both baselines (raw, detrended, corrected): {', '.join(beating) if beating else 'none'}."
        )
    return lines


def correlation_summary(correlations: pd.DataFrame) -> pd.DataFrame:
    """Compact metric x group Spearman table (post-memorization) with the baselines; * = beats both
    baselines after the correction (analysis.py), retrospective metrics named as such."""
    rows = correlations[correlations["window"] == SUMMARY_WINDOW]
    spearman = rows.groupby(["metric", "group"])["spearman"].first().unstack("group")  # NaN (n < min_n) kept
    beats = rows.groupby(["metric", "group"])["beats_baselines"].any().unstack("group")
    marked = spearman.map(lambda v: f"{v:+.2f}" if np.isfinite(v) else "–").astype(object)
    for metric in marked.index:
        for group in marked.columns:
            if metric in beats.index and bool(beats.loc[metric, group]):
                marked.loc[metric, group] += " *"
    retrospective = rows.groupby("metric")["retrospective"].any()
    marked.index = [f"{m} (retrospective)" if retrospective.get(m, False) else m for m in marked.index]
    return marked.rename_axis("metric").rename_axis(columns="group").reset_index()


def star_rule(min_n: int = MIN_N) -> str:
    return (f"* in the table below: a monitor with a declared direction, in a group whose accuracy rises, with the "
            f"declared sign, |Spearman| at least both trivial baselines' (step, training loss), a detrended (partial, "
            f"controlling for step) correlation stronger than the loss', and a partial p-value that survives "
            f"Benjamini-Hochberg at {ALPHA} over every row judged in this run (all groups, windows and metrics). "
            f"No correlation from fewer than {min_n} checkpoints. Retrospective metrics "
            f"({', '.join(sorted(RETROSPECTIVE))}, and any metric of the memorized sample set) are never starred.")


# the config sections each stage's tables depend on, read from that stage's own table
STAGE_CONFIG = {
    "record and reduce (metrics.parquet)": ("metrics", ("model", "checkpoints", "samples", "record", "metrics")),
    "evaluate (accuracy.parquet)": ("accuracy", ("eval", "tune")),
    "analyze (contrast, correlations, onsets)": ("contrast", ("analysis",)),
}


def _tagged_config(path: Path) -> dict:
    text = read_tags(path).get("config") or ""
    return yaml.safe_load(text) if text else {}


@dataclass
class RunTables:
    """What the report reads from a run directory (None: missing or empty), and per stage the
    config its tables were computed with (each table keeps it in its tags; config.yaml is only the
    last invocation's, which may not have recomputed every stage)."""

    run: RunDir
    metrics: pd.DataFrame | None
    accuracy: pd.DataFrame | None
    correlations: pd.DataFrame | None
    onsets: pd.DataFrame | None
    failures: pd.DataFrame | None
    configs: dict[str, dict]  # table name (metrics, accuracy, contrast) -> its config

    @classmethod
    def read(cls, run: RunDir) -> RunTables:
        configs = {name: _tagged_config(getattr(run, name)) for name, _ in STAGE_CONFIG.values()}
        return cls(run, _read(run.metrics), _read(run.accuracy), _read(run.correlations), _read(run.onsets),
                   _read(run.failures), configs)

    @property
    def config(self) -> dict:
        """The config of the analysis that made the shown correlations (else the reduce's)."""
        return self.configs["contrast"] or self.configs["metrics"]

    @property
    def analysis(self) -> dict:
        return self.config.get("analysis") or {}


def _config_section(tables: RunTables) -> list[str]:
    """Per stage, the settings its figures come from (read from that stage's own table)."""
    parts = ["<h2>Config</h2><p>Per stage, the settings of the run that computed its tables.</p>"]
    for title, (name, sections) in STAGE_CONFIG.items():
        config = tables.configs[name]
        shown = {section: config[section] for section in sections if section in config}
        if shown:
            text = yaml.safe_dump(shown, sort_keys=False, default_flow_style=False)
            parts.append(f"<h3>{html.escape(title)}</h3><pre>{html.escape(text)}</pre>")
    if len(parts) == 1:
        parts.append("<p>no stage has written a table yet</p>")
    return parts


def _header(tables: RunTables) -> list[str]:
    parts = [f"<h1>moegrok report</h1><p>run directory <code>{html.escape(str(tables.run.root.resolve()))}</code></p>"]
    missing = [MISSING[name] for name in ("metrics", "accuracy", "correlations") if getattr(tables, name) is None]
    if missing:
        parts.append("<h2>Not in this report</h2><ul>" + "".join(f"<li>{html.escape(m)}</li>" for m in missing)
                     + "</ul>")
    accuracy = tables.accuracy
    if accuracy is not None and "unisolated" in accuracy and accuracy["unisolated"].sum():
        marked = accuracy[accuracy["unisolated"] > 0].groupby(["benchmark", "group"])["unisolated"].max()
        parts.append("<h2>Code scores without isolation</h2><p><b>These code scores come from generated programs run "
                     "WITHOUT the sandbox's isolation (eval.sandbox=unisolated, no bubblewrap on the machine):</b> "
                     + ", ".join(f"{html.escape(b)} / {html.escape(g)} ({n} items per checkpoint)"
                                 for (b, g), n in marked.items()) + ".</p>")
    return parts


def _onsets_section(tables: RunTables) -> list[str]:
    onsets = tables.onsets
    if onsets is None:
        return []
    return ["<h2>Memorization and generalization per group</h2>", table(onsets),
            f"<p>Groups generalize asynchronously: <b>{'yes' if asynchronous_groups(onsets) else 'no'}</b> "
            "(distinct half-rise steps).</p>"]


def _verdict_section(tables: RunTables) -> list[str]:
    correlations = tables.correlations
    if correlations is None:
        return []
    lines = verdicts(correlations, tables.onsets)
    return ["<h2>Verdict</h2><ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in lines)
            + f"</ul><p>{html.escape(star_rule(tables.analysis.get('min_n', MIN_N)))}</p>",
            f"<h3>Spearman with accuracy after memorization</h3>{table(correlation_summary(correlations))}"]


def _curves_section(tables: RunTables) -> list[str]:
    """Per group and benchmark: accuracy and the metric curves vs step, and the metrics against
    accuracy (scatter)."""
    metrics, accuracy, onsets = tables.metrics, tables.accuracy, tables.onsets
    if metrics is None:
        return []
    sample_set = tables.analysis.get("sample_set", "all")
    if accuracy is not None:
        joined = join_accuracy(metrics, accuracy, sample_set=sample_set, group_map=tables.analysis.get("group_map")
                               or {})
    else:  # no evaluation: metric curves alone
        joined = metrics[metrics["sample_set"] == sample_set].assign(benchmark="none", accuracy=np.nan)
    correlations = tables.correlations if tables.correlations is not None else pd.DataFrame(
        columns=["group", "benchmark", "metric", "window", "spearman"])
    curve_metrics = [m for m in CURVE_METRICS if m in joined and joined[m].notna().any()]
    parts = [f"<h2>Curves per group</h2><p>sample set: {html.escape(sample_set)}</p>"]
    if not curve_metrics:
        parts.append(f"<p>No pathway metric has a value for the sample set {html.escape(sample_set)} at any "
                     "checkpoint (e.g. no sample is memorized yet); only accuracy is drawn.</p>")
    for (group, benchmark), curve in joined.groupby(["group", "benchmark"], sort=True):
        curve = curve.sort_values("step")
        onset_row = None
        if onsets is not None:
            match = onsets[(onsets["group"] == group) & (onsets["benchmark"] == benchmark)]
            onset_row = match.iloc[0] if len(match) else None
        parts.append(f"<h3>{html.escape(group)} / {html.escape(benchmark)}</h3>")
        parts.append(png(_curves_figure(group, curve, onset_row, curve_metrics),
                         tables.run.figures / f"curves_{group}_{benchmark}.png"))
        if curve_metrics:
            group_corr = correlations[(correlations["group"] == group) & (correlations["benchmark"] == benchmark)]
            parts.append(png(_scatter_figure(group, curve, group_corr, curve_metrics),
                             tables.run.figures / f"scatter_{group}_{benchmark}.png"))
    return parts


def _med_section(tables: RunTables) -> list[str]:
    """MED against the held-out loss of the toy zoo's training log, where there is one."""
    train_log = as_path((tables.config.get("checkpoints") or {}).get("dir") or "__none__") / "train_log.parquet"
    if tables.metrics is None or not train_log.exists() or not tables.metrics["med"].notna().any():
        return []
    figure = _med_figure(read_parquet(train_log), tables.metrics)
    return ["<h2>Embedding progress measure (toy zoo)</h2>",
            png(figure, tables.run.figures / "med_vs_heldout_loss.png")]


def _correlations_section(tables: RunTables) -> list[str]:
    if tables.correlations is None:
        return []
    shown = tables.correlations.copy()
    shown["paper"] = shown["metric"].map(PAPER_VALUES).fillna("")
    columns = ["group", "benchmark", "window", "metric", "retrospective", "direction", "n", "spearman",
               "spearman_p", "pearson", "partial_spearman", "partial_p", "partial_q", "diff_spearman",
               "step_spearman", "loss_spearman", "judged", "beats_baselines", "paper"]
    return ["<h2>All correlations</h2><p>Baselines: <code>step</code> (checkpoint step) and "
            "<code>loss_mean</code> (training loss). Paper values: Table 1 of arXiv 2506.21551, "
            "after the sustained rise.</p>", table(shown[columns])]


def _calibrated_section(verdicts: pd.DataFrame | None) -> list[str]:
    """What the study's calibrated rules claim per group, beside their held-out error rates."""
    if verdicts is None or verdicts.empty:
        return []
    shown = verdicts[["group", "rule", "verdict", "alarm_step", "false_alarm_rate", "miss_rate", "onset_mae",
                      "scored_groups", "source"]]
    return ["<h2>Calibrated verdicts</h2><p>Each rule's claim on this run (training side only), beside how often "
            "such claims were wrong on the study's toy zoos, held out (docs/findings.md): false-alarm rate among "
            "groups that never generalized, miss rate among grokking groups, mean |onset error| in steps. Measured "
            "on toy zoos: a reference, not a guarantee.</p>", table(shown)]


def write_report(run_dir: str | Path) -> Path:
    """report.html and figures/ of a run directory, from its stored tables."""
    tables = RunTables.read(RunDir(run_dir))
    parts = [*_header(tables), *_onsets_section(tables),
             *contrast_section(_read(tables.run.contrast), tables.onsets, tables.run.figures),
             *_calibrated_section(_read(tables.run.verdicts)), *_verdict_section(tables),
             *_curves_section(tables), *_med_section(tables),
             *_routing_section(tables.run, tables.onsets), *_correlations_section(tables),
             "<h2>Failures</h2>" + (table(tables.failures.drop(columns=["stack"], errors="ignore"))
                                    if tables.failures is not None else "<p>none</p>"),
             *_config_section(tables)]
    write_text(page("moegrok report", parts), tables.run.report)
    return tables.run.report
