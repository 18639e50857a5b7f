import numpy as np
import pandas as pd
import pytest

from moegrok.analysis.correlations import analyze, beats_baselines, correlate, partial_spearman
from moegrok.analysis.onsets import onset


def test_onset_is_the_last_checkpoint_before_a_sustained_rise():
    steps = np.arange(0, 100, 10, dtype=float)
    accuracy = np.array([0.0, 0.02, 0.05, 0.3, 0.1, 0.04, 0.2, 0.5, 0.8, 0.9])  # blip at 30, sustained from 60
    assert onset(steps, accuracy, start_step=0, min_rise=0.1) == 50
    assert onset(steps, accuracy, start_step=40, min_rise=0.1) == 50
    assert np.isnan(onset(steps, np.full(10, 0.05), start_step=0, min_rise=0.1))


def test_partial_correlation_removes_a_shared_trend():
    step = np.arange(30, dtype=float)
    rng = np.random.default_rng(0)
    accuracy = step / 30 + rng.normal(0, 0.05, 30)
    only_step = -np.log1p(step)  # any monotone function of step
    assert partial_spearman(only_step, accuracy, step)[0] == 0.0
    noise = rng.normal(0, 0.05, 30)
    tracker = -(accuracy + noise * 0.1)  # follows accuracy's wiggles too
    rho, p = partial_spearman(tracker, accuracy, step)
    assert rho < -0.5 and p < 0.01


def synthetic_tables(metric_fn, *, num=20, seed=0):
    """Two groups; accuracy rises after memorization with noise; one metric column."""
    rng = np.random.default_rng(seed)
    rows, acc_rows, memorized = [], [], []
    for group, delay in (("a", 5), ("b", 10)):
        step = np.arange(num) * 100.0
        accuracy = np.clip((np.arange(num) - delay) / 8, 0, 1) * 0.9 + rng.normal(0, 0.03, num)
        loss = np.exp(-np.arange(num) / 2) + rng.normal(0, 0.01, num)
        for i in range(num):
            for sample_set in ("all", "memorized"):
                rows.append({"checkpoint": f"step{int(step[i])}", "step": int(step[i]), "group": group,
                             "sample_set": sample_set, "num_samples": 10, "loss_mean": loss[i],
                             "pathway_distance": metric_fn(step[i], accuracy[i], rng)})
            acc_rows.append({"checkpoint": f"step{int(step[i])}", "step": int(step[i]), "benchmark": "b",
                             "group": group, "accuracy": accuracy[i], "n": 100})
        memorized += [{"sample_id": f"{group}{j}", "group": group, "eps": 0.1, "memorized_since": 200.0}
                      for j in range(10)]
    return pd.DataFrame(rows), pd.DataFrame(acc_rows), pd.DataFrame(memorized)


def test_a_function_of_step_never_beats_the_baselines():
    metrics, accuracy, memorized = synthetic_tables(lambda step, acc, rng: 10 - np.log1p(step))
    correlations, _ = analyze(metrics, accuracy, memorized)
    rows = correlations[correlations["metric"] == "pathway_distance"]
    assert len(rows) == 2 * 3  # groups x windows
    assert not rows["beats_baselines"].any()
    post = rows[rows["window"] == "post_memorization"]
    assert (post["spearman"].abs() > 0.8).all()  # the monotone trap: strong raw correlation ...
    assert (post["partial_spearman"].abs() < 1e-9).all()  # ... and nothing once step is controlled


def test_a_metric_that_tracks_accuracy_beats_them():
    metrics, accuracy, memorized = synthetic_tables(lambda step, acc, rng: 5 - 4 * acc)
    correlations, _ = analyze(metrics, accuracy, memorized)
    post = correlations["window"] == "post_memorization"
    rows = correlations[(correlations["metric"] == "pathway_distance") & post]
    assert rows["beats_baselines"].all()
    assert (rows["spearman"] == -1.0).all()
    baseline = correlations[(correlations["metric"] == "step") & (correlations["window"] == "post_memorization")]
    assert baseline["is_baseline"].all() and not baseline["beats_baselines"].any()


def test_onsets_and_lag():
    metrics, accuracy, memorized = synthetic_tables(lambda step, acc, rng: 5 - 4 * acc)
    correlations, onsets = analyze(metrics, accuracy, memorized)
    onsets = onsets.set_index("group")
    assert onsets.loc["a", "memorization_step"] == 200
    assert onsets.loc["a", "generalization_onset"] < onsets.loc["b", "generalization_onset"]
    assert onsets.loc["b", "lag_steps"] == onsets.loc["b", "generalization_onset"] - 200
    assert "lead_steps" not in correlations  # a metric's onset is the causal detector's, not a scaled curve's


def test_directions_are_declared_never_read_from_accuracy():
    """A metric that tracks accuracy in the direction opposite to its declared one gets no star, and
    one without a declared direction is not judged at all."""
    metrics, accuracy, memorized = synthetic_tables(lambda step, acc, rng: 1 + 4 * acc)  # a distance that rises
    metrics["undeclared_metric"] = metrics["pathway_distance"]
    correlations, _ = analyze(metrics, accuracy, memorized)
    post = correlations[correlations["window"] == "post_memorization"].set_index(["metric", "group"])
    assert (post.loc["pathway_distance", "spearman"] == 1.0).all() and (post.loc["pathway_distance", "raw_beats"]).all()
    assert not post.loc["pathway_distance", "sign_as_declared"].any()
    assert not post.loc["pathway_distance", "beats_baselines"].any()
    assert not post.loc["undeclared_metric", "judged"].any()
    assert not post.loc["undeclared_metric", "beats_baselines"].any()


def test_retrospective_metrics_and_groups_that_never_rise_get_no_star():
    metrics, accuracy, memorized = synthetic_tables(lambda step, acc, rng: 5 - 4 * acc)
    metrics["router_saturation"] = -metrics["pathway_distance"]  # the same tracker, but needs the last checkpoint
    correlations, _ = analyze(metrics, accuracy, memorized)
    saturation = correlations[correlations["metric"] == "router_saturation"]
    assert saturation["retrospective"].all() and not saturation["beats_baselines"].any()
    flat = accuracy.assign(accuracy=0.02)
    correlations, onsets = analyze(metrics, flat, memorized)
    assert onsets["generalization_onset"].isna().all()
    assert not correlations["beats_baselines"].any() and not correlations["judged"].any()
    memorized_rows, _ = analyze(metrics, accuracy, memorized, sample_set="memorized")
    assert memorized_rows["retrospective"].all() and not memorized_rows["beats_baselines"].any()


def test_too_few_checkpoints_give_no_correlation():
    metrics, accuracy, memorized = synthetic_tables(lambda step, acc, rng: 5 - 4 * acc, num=7)
    correlations, _ = analyze(metrics, accuracy, memorized)
    assert correlations["spearman"].isna().all() and correlations["partial_spearman"].isna().all()
    assert not correlations["beats_baselines"].any()
    assert correlate(pd.DataFrame({"step": np.arange(8.0), "accuracy": np.arange(8.0), "x": np.arange(8.0),
                                   "loss_mean": 0.0}), "x")["spearman"] == 1.0


def test_noise_metrics_do_not_survive_the_correction(monkeypatch):
    """Forty metrics of pure noise: some raw p-values fall below 0.05, none survives
    Benjamini-Hochberg, so none is starred."""
    metrics, accuracy, memorized = synthetic_tables(lambda step, acc, rng: 5 - 4 * acc, num=20)
    rng = np.random.default_rng(3)
    for index in range(40):
        metrics[f"pathway_distance_norm_v{index}"] = rng.normal(size=len(metrics))
    from moegrok.metrics import declarations as metric_info

    for index in range(40):  # declared like the distance they imitate
        monkeypatch.setitem(metric_info.DIRECTIONS, f"pathway_distance_norm_v{index}", -1)
    correlations, _ = analyze(metrics, accuracy, memorized)
    noise = correlations[correlations["metric"].str.startswith("pathway_distance_norm_v")]
    assert (noise["partial_p"] < 0.05).any() and not noise["beats_baselines"].any()
    assert correlations.loc[correlations["metric"] == "pathway_distance", "beats_baselines"].any()


def test_non_monotone_accuracy_separates_a_tracker_from_the_step():
    step = np.arange(24, dtype=float)
    accuracy = np.concatenate([np.linspace(0, 1, 8), np.linspace(1, 0.2, 8), np.linspace(0.2, 1, 8)])
    curve = pd.DataFrame({"step": step, "accuracy": accuracy, "tracker": -accuracy, "loss_mean": np.exp(-step)})
    tracker = correlate(curve, "tracker")
    steps_only = correlate(curve.assign(tracker=step), "tracker")
    assert tracker["spearman"] == pytest.approx(-1.0) and abs(steps_only["spearman"]) < 0.5
    base = {"step": steps_only, "loss_mean": correlate(curve, "loss_mean")}
    assert beats_baselines(tracker, base)
