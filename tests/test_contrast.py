import numpy as np
import pandas as pd
import pytest
from rapidfuzz.distance import Levenshtein

from moegrok.contrast import _statistic, bootstrap_weights, contrast_summary, group_contrasts, model_wide_contrasts
from moegrok.pathways import mean_pairwise_distance
from moegrok.sample_series import GroupSeries, group_series

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
    assert _statistic(series["add"], weights_BN)[1, 1] == pytest.approx(np.mean(pairs))


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
