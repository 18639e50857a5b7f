"""One page for a grid of sweeps (`--multirun` run directories): each run's metrics, onsets and
correlations side by side, each run labelled by the config values in which the runs differ.
Read-only over the runs' stored tables, like the report of one run.

`grid.parquet` holds one row per run x group x benchmark x metric: the run's label and run_dir,
its differing config values (one column per dotted key), the metric's value at the first and
last checkpoint (the run's analysis.sample_set), the post-memorization correlation with accuracy
(n, spearman, partial_spearman, partial_q, step_spearman, loss_spearman, beats_baselines) and
the group's memorization_step and generalization_onset. Without evaluation, benchmark and the
columns after `last` are empty.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from moegrok.analysis.correlations import BASELINES, MIN_N, metric_columns
from moegrok.report.pages import page, png, table
from moegrok.report.run import CURVE_METRICS, SUMMARY_WINDOW
from moegrok.store import RunDir, read_parquet, write_parquet

# how a run ran rather than what it computed: never a label
NOT_LABELS = ("run_dir", "stage", "progress", "cluster.")
CORRELATION_COLUMNS = ["n", "spearman", "partial_spearman", "partial_q", "step_spearman", "loss_spearman",
                       "beats_baselines"]
ONSET_COLUMNS = ["memorization_step", "generalization_onset"]
ROW_COLUMNS = ["group", "benchmark", "metric", "first", "last", *CORRELATION_COLUMNS, *ONSET_COLUMNS]


def flatten(node: dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys of a nested config; lists and empty mappings as JSON text, so they compare."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list | dict) else value
    return flat


def differing_values(configs: list[dict]) -> pd.DataFrame:
    """One row per run: the config values (dotted keys) that are not the same in every run."""
    flat = [flatten(config) for config in configs]
    keys = sorted({key for one in flat for key in one if not key.startswith(NOT_LABELS)})
    differing = [key for key in keys if len({json.dumps(one.get(key), default=str) for one in flat}) > 1]
    return pd.DataFrame([{key: one.get(key) for key in differing} for one in flat], columns=differing)


def run_labels(run_dirs: list[Path], values: pd.DataFrame) -> list[str]:
    """'key=value, ...' of each run's differing values; the directory name where that is not unique."""
    labels = [", ".join(f"{key}={value}" for key, value in row.items()) for _, row in values.iterrows()]
    if len(set(labels)) < len(labels) or not all(labels):
        labels = [f"{label} ({Path(d).name})" if label else Path(d).name for label, d in zip(labels, run_dirs,
                                                                                           strict=True)]
    return labels


def run_rows(run: RunDir, sample_set: str) -> pd.DataFrame:
    """One run's rows of grid.parquet (without the label columns)."""
    metrics = read_parquet(run.metrics)
    chosen = metrics[metrics["sample_set"] == sample_set].sort_values("step")
    names = [*metric_columns(metrics), *BASELINES]
    rows = [{"group": group, "metric": name, "first": part[name].iloc[0], "last": part[name].iloc[-1]}
            for group, part in chosen.groupby("group", sort=True) for name in names]
    frame = pd.DataFrame(rows, columns=["group", "metric", "first", "last"])
    if run.correlations.exists():
        correlations = read_parquet(run.correlations)
        window = correlations[correlations["window"] == SUMMARY_WINDOW]
        frame = frame.merge(window[["group", "benchmark", "metric", *CORRELATION_COLUMNS]], on=["group", "metric"],
                            how="left")
    else:
        frame = frame.assign(benchmark=None, **{column: np.nan for column in CORRELATION_COLUMNS})
    if run.onsets.exists():
        frame = frame.merge(read_parquet(run.onsets)[["group", "benchmark", *ONSET_COLUMNS]],
                            on=["group", "benchmark"], how="left")
    else:
        frame = frame.assign(**{column: np.nan for column in ONSET_COLUMNS})
    return frame[ROW_COLUMNS]


def grid_table(run_dirs: list[Path]) -> pd.DataFrame:
    """grid.parquet's rows for the runs (module docstring)."""
    configs = [yaml.safe_load(RunDir(d).config.read_text()) for d in run_dirs]
    values = differing_values(configs)
    labels = run_labels(run_dirs, values)
    frames = []
    for run_dir, config, label, (_, row) in zip(run_dirs, configs, labels, values.iterrows(), strict=True):
        rows = run_rows(RunDir(run_dir), (config.get("analysis") or {}).get("sample_set", "memorized"))
        frames.append(rows.assign(run=label, run_dir=str(run_dir), **row.to_dict()))
    return pd.concat(frames, ignore_index=True)[["run", "run_dir", *values.columns, *ROW_COLUMNS]]


def _side_by_side(grid: pd.DataFrame, index: list[str], value: str, runs: list[str]) -> pd.DataFrame:
    """One row per `index` combination that some run has (never a group x benchmark pair that no
    run evaluated), one column per run."""
    wide = grid.pivot_table(index=index, columns="run", values=value, aggfunc="first", dropna=False)
    wide = wide.reindex(columns=runs).reset_index()
    wide = wide.merge(grid[index].dropna().drop_duplicates(), on=index, how="inner")
    wide.columns.name = None
    return wide


def _spearman_text(row: pd.Series) -> str:
    if not np.isfinite(row["spearman"]):
        return "–"
    return f"{row['spearman']:+.2f}" + (" *" if bool(row["beats_baselines"]) else "")


def _curves_figure(group: str, curves: dict[str, pd.DataFrame], metrics: list[str]) -> Figure:
    fig = Figure(figsize=(3.1 * len(metrics), 2.9))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for label, curve in curves.items():
            ax.plot(curve["step"], curve[metric], marker="o", ms=3, label=label)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"group {group}: one line per run", fontsize=10)
    fig.tight_layout()
    return fig


def write_grid_report(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """grid.parquet and grid.html (figures in figures/) in `out_dir`; returns the page's path."""
    run_dirs, out = [Path(d) for d in run_dirs], Path(out_dir)
    grid = grid_table(run_dirs)
    write_parquet(grid, out / "grid.parquet")
    runs = list(dict.fromkeys(grid["run"]))
    label_columns = list(grid.columns[2:grid.columns.get_loc("group")])  # the differing config values
    overview = grid.drop_duplicates("run")[["run", "run_dir", *label_columns]].reset_index(drop=True)
    overview["checkpoints"] = [read_parquet(RunDir(d).metrics, columns=["step"])["step"].nunique() for d in run_dirs]
    overview["failures"] = [len(read_parquet(RunDir(d).failures)) if RunDir(d).failures.exists() else 0
                            for d in run_dirs]
    parts = ["<h1>moegrok grid report</h1>",
             f"<p>{len(runs)} runs, labelled by the config values in which they differ.</p>", table(overview)]
    evaluated = grid.dropna(subset=["benchmark"])
    if len(evaluated):
        onsets = evaluated.drop_duplicates(["run", "group", "benchmark"])
        parts.append("<h2>Memorization and generalization per group</h2><h3>memorization step</h3>"
                     + table(_side_by_side(onsets, ["group", "benchmark"], "memorization_step", runs))
                     + "<h3>generalization onset</h3>"
                     + table(_side_by_side(onsets, ["group", "benchmark"], "generalization_onset", runs)))
        shown = evaluated.assign(spearman_text=evaluated.apply(_spearman_text, axis=1))
        spearman = _side_by_side(shown, ["group", "benchmark", "metric"], "spearman_text", runs)
        min_n = sorted({(yaml.safe_load(RunDir(d).config.read_text()).get("analysis") or {}).get("min_n", MIN_N)
                        for d in run_dirs})
        parts.append(f"<h2>Spearman with accuracy after memorization</h2><p>* beats both trivial baselines (step, "
                     f"training loss) raw and detrended; the rows <code>step</code> and <code>loss_mean</code> are "
                     f"those baselines. – : no correlation, because the run has fewer than analysis.min_n = "
                     f"{', '.join(map(str, min_n))} checkpoints after the group memorized, or the metric or the "
                     f"accuracy is constant over them.</p>{table(spearman)}")
    else:
        parts.append("<p>No run has accuracy (evaluation was off): metrics only.</p>")
    parts.append("<h2>Metric values at the last checkpoint</h2>"
                 + table(_side_by_side(grid, ["group", "metric"], "last", runs), floatfmt="{:.4g}"))
    parts.append("<h2>Curves per group</h2>")
    curves = {}
    for label, run_dir in zip(runs, run_dirs, strict=True):
        config = yaml.safe_load(RunDir(run_dir).config.read_text())
        metrics = read_parquet(RunDir(run_dir).metrics)
        sample_set = (config.get("analysis") or {}).get("sample_set", "memorized")
        curves[label] = metrics[metrics["sample_set"] == sample_set].sort_values("step")
    shown_metrics = [m for m in CURVE_METRICS if all(m in c and c[m].notna().any() for c in curves.values())]
    for group in sorted(grid["group"].unique()):
        if not shown_metrics:
            break
        per_run = {label: curve[curve["group"] == group] for label, curve in curves.items()}
        parts.append(f"<h3>{html.escape(str(group))}</h3>"
                     + png(_curves_figure(group, per_run, shown_metrics), out / "figures" / f"grid_{group}.png"))
    path = out / "grid.html"
    path.write_text(page("moegrok grid report", parts))
    return path
