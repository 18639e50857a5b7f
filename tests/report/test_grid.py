"""The grid page and grid.parquet from stored tables of runs built in the test."""

import pandas as pd
import pytest
from omegaconf import OmegaConf

from moegrok.config import SweepConfig
from moegrok.report.grid import differing_values, grid_table, write_grid_report
from moegrok.store import RunDir, write_parquet

GROUPS = ("add", "mul")


def stored_run(root, name: str, *, threshold: float, spearman: float | None, onset: float = 300.0) -> RunDir:
    """A run dir with config.yaml, metrics.parquet and (when spearman is given) correlations and onsets."""
    cfg = SweepConfig(run_dir=str(root / name))
    cfg.metrics.weight_share, cfg.analysis.sample_set, cfg.cluster.num_cpus = threshold, "all", 2
    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True)
    run.config.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    write_parquet(pd.DataFrame([{"checkpoint": f"step{step}", "step": step, "group": group, "sample_set": sample_set,
                                 "pathway_distance": threshold * 10 - step / 100 + (sample_set == "memorized"),
                                 "mean_cos": step / 1000, "loss_mean": 1 - step / 1000}
                                for step in (0, 100, 200) for group in GROUPS for sample_set in ("all", "memorized")]),
                  run.metrics)
    if spearman is not None:
        write_parquet(pd.DataFrame([{"group": group, "benchmark": "heldout", "window": window, "metric": metric,
                                     "n": 3, "spearman": spearman if metric == "pathway_distance" else 0.1,
                                     "partial_spearman": 0.0, "step_spearman": 0.9, "loss_spearman": -0.5,
                                     "partial_q": 0.01, "beats_baselines": metric == "pathway_distance"}
                                    for group in GROUPS for window in ("all", "post_memorization")
                                    for metric in ("pathway_distance", "mean_cos", "loss_mean", "step")]),
                      run.correlations)
        write_parquet(pd.DataFrame({"group": list(GROUPS), "benchmark": "heldout", "memorization_step": 100.0,
                                    "generalization_onset": [onset, float("nan")]}), run.onsets)
    return run


def test_grid_puts_each_runs_tables_side_by_side(tmp_path):
    runs = [stored_run(tmp_path, "thr0.5", threshold=0.5, spearman=-0.95, onset=100.0),
            stored_run(tmp_path, "thr0.7", threshold=0.7, spearman=-0.40)]
    grid = grid_table([run.root for run in runs])
    assert list(grid.columns[:3]) == ["run", "run_dir", "metrics.weight_share"]  # only the differing key
    assert set(grid["run"]) == {"metrics.weight_share=0.5", "metrics.weight_share=0.7"}
    assert len(grid) == 2 * len(GROUPS) * 4  # pathway_distance, mean_cos and the baselines step, loss_mean
    for run, spearman in zip(runs, (-0.95, -0.40), strict=True):
        rows = grid[(grid["run_dir"] == str(run.root)) & (grid["metric"] == "pathway_distance")]
        metrics = pd.read_parquet(run.metrics)
        last = metrics[(metrics["sample_set"] == "all") & (metrics["step"] == 200)].set_index("group")
        assert rows.set_index("group")["last"].to_dict() == last["pathway_distance"].to_dict()
        assert (rows["spearman"] == spearman).all() and rows["beats_baselines"].all()
    onsets = grid.drop_duplicates(["run", "group"]).set_index(["run", "group"])["generalization_onset"]
    assert onsets[("metrics.weight_share=0.5", "add")] == 100.0 and onsets[("metrics.weight_share=0.7", "add")] == 300.0

    page = write_grid_report([run.root for run in runs], tmp_path / "out").read_text()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "grid.parquet"), grid, check_dtype=False)
    assert page.count("<th>metrics.weight_share=0.5</th>") == page.count("<th>metrics.weight_share=0.7</th>") >= 4
    assert "<td>-0.95 *</td>" in page and "<td>-0.40 *</td>" in page
    assert (tmp_path / "out" / "figures" / "grid_add.png").stat().st_size > 1000


def test_runs_without_evaluation_show_metrics_only(tmp_path):
    runs = [stored_run(tmp_path, name, threshold=threshold, spearman=None)
            for name, threshold in (("a", 0.5), ("b", 0.8))]
    grid = grid_table([run.root for run in runs])
    assert grid["benchmark"].isna().all() and grid["spearman"].isna().all() and grid["last"].notna().all()
    page = write_grid_report([run.root for run in runs], tmp_path / "out").read_text()
    assert "evaluation was off" in page and "Metric values at the last checkpoint" in page


@pytest.mark.parametrize(("thresholds", "labels"), [((0.5, 0.5), ["a", "b"]), ((0.5, 0.8), ["metrics.weight_share=0.5",
                                                                                          "metrics.weight_share=0.8"])])
def test_runs_are_labelled_by_what_differs(tmp_path, thresholds, labels):
    """run_dir, stage, progress and cluster.* never label a run; identical configs fall back to
    the directory names."""
    runs = [stored_run(tmp_path, name, threshold=t, spearman=None) for name, t in zip("ab", thresholds, strict=True)]
    configs = [OmegaConf.to_container(OmegaConf.load(run.config)) for run in runs]
    configs[1]["cluster"]["address"] = "auto"
    differing = [] if thresholds[0] == thresholds[1] else ["metrics.weight_share"]
    assert list(differing_values(configs).columns) == differing
    assert list(dict.fromkeys(grid_table([run.root for run in runs])["run"])) == labels
