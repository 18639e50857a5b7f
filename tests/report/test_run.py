import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from moegrok.analysis.contrast import contrast_summary
from moegrok.report.contrast import primary_mode
from moegrok.report.pages import table
from moegrok.report.run import CURVE_METRICS, correlation_summary, verdicts, write_report
from moegrok.store import RunDir

FIGURES = ("curves_add_heldout.png", "scatter_add_heldout.png", "curves_mul_heldout.png", "med_vs_heldout_loss.png",
           "routing_vs_step.png", "coactivation.png", "domain_specialization.png")


@pytest.fixture
def stored_run(swept_run):
    """The session's swept run of the tiny zoo (read only)."""
    return swept_run


def test_report_contains_every_figure_and_table(stored_run):
    page = stored_run.report.read_text()
    for name in FIGURES:
        assert (stored_run.figures / name).stat().st_size > 1000, name
    contrast = sorted(stored_run.figures.glob("contrast_*.png"))  # one per per-sample metric
    assert {"contrast_pathway_distance.png", "contrast_mean_cos.png", "contrast_loss_mean.png"} <= {
        path.name for path in contrast}
    assert page.count("<img ") == len(FIGURES) + 1 + len(contrast)  # + the scatter of the second group
    for heading in ("Memorization and generalization per group", "Between-group contrast", "Verdict",
                    "Routing analyses", "All correlations", "Failures", "Config"):
        assert heading in page
    assert "src=\"data:image/png;base64," in page and "http" not in page.split("<h2>Config")[0]


def test_report_shows_the_stored_tables(stored_run):
    """What the page shows is the stored tables, rendered, not a recomputation."""
    page = stored_run.report.read_text()
    onsets, correlations = pd.read_parquet(stored_run.onsets), pd.read_parquet(stored_run.correlations)
    assert table(onsets) in page
    assert table(correlation_summary(correlations)) in page
    lines = verdicts(correlations, onsets)
    assert len(lines) == len(onsets) and all(line in page for line in lines)
    config = page.split("<h2>Config")[1]
    assert "record and reduce (metrics.parquet)" in config and "weight_share: 0.7" in config
    assert "evaluate (accuracy.parquet)" in config and "max_items: 40" in config and "control: mul" in config


def test_each_stage_shows_the_settings_its_tables_come_from(swept_copy):
    """Only the evaluation changes: the page shows the new evaluation settings beside the accuracy
    they produced, and the reduce's settings as they were."""
    from moegrok.pipeline import run_sweep
    from tests.reference.toy import tiny_sweep_config

    zoo = Path(pd.read_parquet(swept_copy.catalog)["uri"].iloc[0]).parent
    cfg = tiny_sweep_config(zoo, swept_copy.root, "analysis.control=mul", "eval.max_items=30",
                            "metrics.max_pairs=1999999")  # not a reduce input the tables depend on: no reduce run
    assert run_sweep(cfg, stages=["evaluate", "analyze", "report"]) == 0
    assert pd.read_parquet(swept_copy.accuracy)["n"].sum() == 3 * 30
    config = swept_copy.report.read_text().split("<h2>Config")[1]
    evaluate = config.split("evaluate (accuracy.parquet)")[1].split("<h3>")[0]
    reduce = config.split("record and reduce (metrics.parquet)")[1].split("<h3>")[0]
    assert "max_items: 30" in evaluate and "max_items: 40" not in evaluate
    assert "max_pairs: 2000000" in reduce  # the reduce did not run again: its tables keep their settings


def test_retrospective_metrics_and_the_correction_are_named(stored_run):
    page = stored_run.report.read_text()
    correlations = pd.read_parquet(stored_run.correlations)
    assert correlations.loc[correlations["metric"] == "router_saturation", "retrospective"].all()
    assert not correlations.loc[correlations["metric"] == "router_saturation_previous", "retrospective"].any()
    summary = correlation_summary(correlations).set_index("metric")
    assert "router_saturation (retrospective)" in summary.index and "router_saturation" not in summary.index
    assert not summary.loc["router_saturation (retrospective)"].str.endswith("*").any()  # never starred
    assert table(correlation_summary(correlations)) in page and "Benjamini-Hochberg" in page
    contrast = pd.read_parquet(stored_run.contrast)
    assert table(contrast_summary(contrast[contrast["mode"] == primary_mode(contrast)])) in page


def test_verdicts_name_fixed_metrics_and_say_when_a_group_never_rises():
    def rows(group, **spearman):
        return [{"group": group, "benchmark": "b", "window": "post_memorization", "metric": metric, "n": 12,
                 "spearman": value, "step_spearman": 0.9, "loss_spearman": -0.5,
                 "beats_baselines": metric == "mean_cos"} for metric, value in spearman.items()]

    correlations = pd.DataFrame(rows("add", pathway_distance=-0.8, mean_cos=0.95, load_entropy=0.99)
                                + rows("mul", pathway_distance=-0.3, mean_cos=0.2))
    onsets = pd.DataFrame({"group": ["add", "mul"], "benchmark": "b", "generalization_onset": [300.0, None]})
    add, mul = verdicts(correlations, onsets)
    assert add == ("add (b), n=12 checkpoints after memorization: Spearman pathway_distance -0.80, mean_cos +0.95; "
                   "baselines: step +0.90, training loss -0.50. Beats both baselines (raw, detrended, corrected): "
                   "mean_cos.")
    assert "load_entropy" not in add  # never the best of many: only the fixed verdict metrics
    assert mul.startswith("mul (b): accuracy never rises") and "noise" in mul


def test_rerunning_the_report_recomputes_nothing(swept_copy):
    tables = sorted(swept_copy.root.glob("*.parquet")) + sorted(swept_copy.root.glob("routing/*/*"))
    stamps = {path: path.stat().st_mtime_ns for path in tables}
    before = swept_copy.report.stat().st_mtime_ns
    write_report(swept_copy.root)
    assert {path: path.stat().st_mtime_ns for path in tables} == stamps
    assert swept_copy.report.stat().st_mtime_ns > before


def test_report_renders_in_headless_chromium(stored_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2400",
                    f"--screenshot={shot}", stored_run.report.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1400)
    assert pixels[..., :3].std() > 0.05  # text, tables and plots, not a blank page


def test_report_without_accuracy_or_metric_values_draws_accuracy_alone(stored_run, tmp_path):
    """Evaluation off and no memorized sample yet: the report is still written, and says why."""
    run_dir = tmp_path / "run"
    shutil.copytree(stored_run.root, run_dir)
    run = RunDir(run_dir)
    shutil.rmtree(run.figures)
    for stored in (run.accuracy, run.correlations, run.onsets):
        stored.unlink()
    metrics = pd.read_parquet(run.metrics)
    metrics[[m for m in CURVE_METRICS if m in metrics]] = float("nan")
    metrics.to_parquet(run.metrics)
    page = write_report(run_dir).read_text()
    assert "only accuracy is drawn" in page
    assert not list(run.figures.glob("scatter_*.png"))


def test_report_of_a_run_with_missing_or_empty_outputs_says_what_is_missing(stored_run, tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    page = write_report(run.root).read_text()  # nothing at all
    assert all(message in page for message in ("no metrics.parquet", "no accuracy", "no correlations"))
    shutil.copy(stored_run.metrics, run.metrics)
    for table_path in (run.accuracy, run.correlations, run.onsets):  # stages that ran and produced nothing
        pd.read_parquet(getattr(stored_run, table_path.stem)).iloc[:0].to_parquet(table_path)
    page = write_report(run.root).read_text()
    assert "no metrics.parquet" not in page and "no accuracy" in page and "no correlations" in page
    assert (run.figures / "curves_add_none.png").exists()  # the metric curves alone
