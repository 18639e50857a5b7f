import numpy as np
import pandas as pd
import pytest
from rapidfuzz.distance import Levenshtein

from moegrok.analysis.contrast import (
    bootstrap_weights,
    contrast_summary,
    group_contrasts,
    model_wide_contrasts,
    statistic,
)
from moegrok.metrics.pathways import mean_pairwise_distance
from moegrok.metrics.series import GroupSeries, checkpoint_series


def group_series(samples: pd.DataFrame, spec: tuple[str, str, object]) -> tuple[np.ndarray, dict[str, GroupSeries]]:
    """(steps, per group its series over every checkpoint) of one metric from a per-sample table in
    memory; samples missing at any checkpoint are left out: the reference for the streaming
    `run_contrasts`."""
    steps = np.sort(samples["step"].unique())
    out = {}
    for group, rows in samples.groupby("group", sort=True):
        present = rows.groupby("sample_id")["step"].nunique()
        ids = np.array(sorted(present.index[present == len(steps)]))
        if len(ids) < 2:
            continue
        parts = [checkpoint_series(rows[rows["step"] == step].set_index("sample_id").reindex(ids), spec)
                 for step in steps]
        out[group] = GroupSeries(parts[0].kind, np.concatenate([part.values for part in parts]))
    return steps, out


STEPS = np.arange(0, 500, 50)  # 10 checkpoints
MEMORIZED = {"add": 100.0, "sub": 100.0, "mul": 100.0}


def mean_series(shift_C: np.ndarray, *, seed: int, num: int = 80) -> GroupSeries:
    """Per-sample values: a sample's own level + a shared per-checkpoint shift + noise."""
    rng = np.random.default_rng(seed)
    own_N = rng.normal(0.2, 0.1, num)
    return GroupSeries("mean", own_N[None, :] + shift_C[:, None] + rng.normal(0, 0.02, (len(shift_C), num)))


def test_a_planted_difference_in_differences_is_recovered():
    time_trend = 0.001 * STEPS  # every group drifts the same way with time
    rise = np.where(STEPS > 250, 0.1, 0.0)  # add's own change after step 250
    series = {"add": mean_series(time_trend + rise, seed=0), "mul": mean_series(time_trend, seed=1)}
    rows = group_contrasts(series, STEPS, MEMORIZED, metric="mean_cos", control="mul", num_draws=200)
    add = rows[rows["group"] == "add"].set_index("step")
    assert add["did"].loc[100] == 0 and np.isnan(add["se"].loc[100])  # t0: no change yet
    late, early = add.loc[300:], add.loc[150:250]
    assert ((late["ci_low"] < 0.1) & (late["ci_high"] > 0.1)).mean() >= 0.75  # the CI covers the truth ...
    assert (late["z"] > 10).all()  # ... and is far from 0 (mean_cos rises: declared +1)
    assert (early["z"].abs() < 4).all()  # the shared time trend is gone
    assert (add["change"].loc[300:] > 0.1).all()  # the raw change still carries the trend
    mul = rows[rows["group"] == "mul"]
    assert set(mul["reference"]) == {"others"}  # the control against the others' mean


def test_a_pure_time_trend_gives_no_contrast():
    trend = np.linspace(0, 1, len(STEPS))
    series = {g: mean_series(trend, seed=i) for i, g in enumerate(["add", "sub", "mul"])}
    rows = group_contrasts(series, STEPS, MEMORIZED, metric="mean_cos", control=None, num_draws=200)
    assert set(rows["reference"]) == {"others"}
    after = rows[rows["step"] > 100]
    assert (after["ci_low"] < 0).mean() > 0.8 and (after["ci_high"] > 0).mean() > 0.8
    assert (after["self_z"] > 10).all()  # without the contrast, time alone looks like a signal


def test_pair_statistic_is_the_mean_pairwise_distance_and_its_bootstrap_resamples_samples():
    rng = np.random.default_rng(0)
    samples = pd.DataFrame([{"checkpoint": f"step{s}", "step": s, "sample_id": f"s{i}", "group": g,
                             "pathway": "".join(rng.choice(list("abcd"), 5))}
                            for s in (0, 50) for g in ("add", "mul") for i in range(12)])
    steps, series = group_series(samples, ("pairs", "pathway", Levenshtein.distance))
    rows = group_contrasts(series, steps, {"add": 0.0, "mul": 0.0}, metric="pathway_distance", control="mul",
                           num_draws=50)
    for (group, step), row in rows.set_index(["group", "step"]).iterrows():
        ids = samples[(samples["group"] == group) & (samples["step"] == step)].sort_values("sample_id")["pathway"]
        assert row["level"] == pytest.approx(mean_pairwise_distance(ids.tolist())[0])
    # one draw by hand: the mean over the draws' pairs of distinct samples
    weights_BN = bootstrap_weights(12, num_draws=3, seed=5)
    draws = np.repeat(np.arange(12), weights_BN[1].astype(int))
    distances = series["add"].values[1]
    pairs = [distances[a, b] for a in draws for b in draws if a != b]
    assert statistic(series["add"], weights_BN)[1, 1] == pytest.approx(np.mean(pairs))


def test_model_wide_measure_has_no_contrast_only_its_own_change():
    diffs_CP = np.tile(np.linspace(2.0, 1.0, len(STEPS))[:, None], (1, 46)) + 0.01 * np.arange(46)
    rows = model_wide_contrasts(diffs_CP, STEPS, {"add": 100.0, "mul": 150.0}, metric="med", num_draws=50)
    assert rows["did"].isna().all() and set(rows["group"]) == {"add", "mul"}
    add = rows[rows["group"] == "add"].set_index("step")
    assert add["change"].loc[450] == pytest.approx(-(2.0 - 1.0) * 7 / 9)
    assert add["self_z"].loc[450] > 10  # MED falls: declared -1


def test_summary_and_bad_control():
    series = {"add": mean_series(np.where(STEPS > 250, 0.2, 0.0), seed=0), "mul": mean_series(np.zeros(10), seed=1)}
    rows = group_contrasts(series, STEPS, MEMORIZED, metric="mean_cos", control="mul", num_draws=100)
    summary = contrast_summary(rows).set_index("group")
    assert summary.loc["add", "verdict"] == "as declared" and summary.loc["mul", "verdict"] == "against"
    with pytest.raises(ValueError, match="analysis.control='div'"):
        group_contrasts(series, STEPS, MEMORIZED, metric="mean_cos", control="div")


def test_the_run_contrast_streams_checkpoints_and_equals_the_contrast_of_the_whole_table(tmp_path):
    """run_contrasts reads sample_metrics/ one checkpoint at a time; its rows equal group_contrasts
    over the whole per-sample table in memory. A sample whose shard is missing at a checkpoint (its
    record unit failed) is left out, one without a pathway at a checkpoint weighs 0 there (NaN row
    and column of the distances). A second call computes nothing again: it reads the statistics kept
    per checkpoint."""
    from moegrok.analysis.contrast import run_contrasts, with_trajectory_noise
    from moegrok.store import RunDir, write_parquet

    rng = np.random.default_rng(1)
    samples = pd.DataFrame([{"checkpoint": f"step{s}", "step": s, "sample_id": f"s{i:02d}", "group": g,
                             "pathway": "".join(rng.choice(list("abcd"), 5)), "mean_cos": rng.normal(s / 100, 0.1),
                             "loss": rng.random()}
                            for s in (0, 50, 100) for g in ("add", "mul", "sub") for i in range(10)])
    samples["shard"] = (samples["sample_id"] == "s03").astype(int)  # s03 of every group in a shard of its own
    samples.loc[(samples["sample_id"] == "s04") & (samples["step"] == 100), "pathway"] = None
    run = RunDir(tmp_path)
    write_parquet(samples.query("step == 0")[["sample_id", "group", "shard"]], run.samples)
    for (step, shard), rows in samples.groupby(["step", "shard"]):
        if not (step == 50 and shard == 1):  # that shard's unit failed at step 50
            write_parquet(rows.drop(columns="shard").reset_index(drop=True),
                          run.sample_metrics / f"step{step}" / f"shard{shard:05d}.parquet")
    samples = samples.query("not (step == 50 and shard == 1)").drop(columns="shard")
    memorization = {"add": 0.0, "mul": 0.0, "sub": 50.0}
    streamed = run_contrasts(run, memorization, control="mul", num_draws=30, seed=2)
    kept = {path: path.stat().st_mtime_ns for path in (tmp_path / "parts" / "contrast").glob("*.parquet")}
    pd.testing.assert_frame_equal(run_contrasts(run, memorization, control="mul", num_draws=30, seed=2), streamed)
    assert len(kept) == 3 and kept == {p: p.stat().st_mtime_ns for p in kept}
    for metric, spec in {"pathway_distance": ("pairs", "pathway", Levenshtein.distance),
                         "mean_cos": ("mean", "mean_cos", None), "loss_mean": ("mean", "loss", None)}.items():
        steps, series = group_series(samples, spec)
        assert all(s.num_samples == 9 for s in series.values())  # s03 missed a checkpoint in every group
        for mode, control in (("control", "mul"), ("others", None)):  # others: the control left out of the mean
            expected = with_trajectory_noise(group_contrasts(series, steps, memorization, metric=metric,
                                                             control=control, num_draws=30, seed=2, exclude="mul"))
            got = streamed[(streamed["metric"] == metric) & (streamed["mode"] == mode)].drop(columns="mode")
            pd.testing.assert_frame_equal(got.reset_index(drop=True), expected[got.columns])
    level = streamed.query("metric == 'pathway_distance' and mode == 'others' and group == 'add' and step == 100")
    present = samples.query("group == 'add' and step == 100 and sample_id != 's03' and pathway.notna()")
    assert level["level"].item() == pytest.approx(mean_pairwise_distance(sorted(present["pathway"]))[0])
