import numpy as np
import pandas as pd
import pytest

from moegrok.analysis.calibration import LOSS_SPIKE, SILENT, STEP_MEAN
from moegrok.config import StudyConfig, StudyZooConfig, compose_config
from moegrok.study.detection import evaluate_detectors, zoo_dynamics
from moegrok.study.run import STUDY_COLUMNS, run_study

STEPS = np.arange(100, 950, 50)
# zoo -> {group: accuracy onset or None}; every group memorizes at step 100, all collapse at 350
ZOOS = {"z0": {"add": 400, "sub": 550, "mul": None, "canary": None},
        "z1": {"add": 450, "sub": 600, "mul": None, "canary": None},
        "z2": {"add": 400, "sub": 650, "mul": None, "canary": None},
        "never": {"add": None, "sub": None, "mul": None, "canary": None}}


def synthetic_contrast(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A contrast table with three metrics: a tracker (rises in a group after its accuracy onset),
    a function of time (rises in every group alike), and the training loss (spikes at the shared
    collapse in every group). Sample se 1; the run's noise is the checkpoint jitter."""
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    for zoo, groups in ZOOS.items():
        for group, onset in groups.items():
            truth.append({"zoo": zoo, "group": group, "family": "f" if zoo != "never" else "g", "collapse": True,
                          "status": "grokking" if onset else "never", "accuracy_onset": onset or np.nan,
                          "last_step": 900.0, "checkpoint_every": 50.0, "memorization_step": 100.0})
            own = np.where((onset or 10_000) < STEPS, 40.0, 0.0)
            time = (STEPS - 100) / 10
            loss = np.where(STEPS == 350, 5.0, 0.02)
            for metric, sign, did, change, level in (("mean_cos_answer", 1, own, own, own),
                                                     ("pathway_length", -1, 0.0 * time, -time, -time),
                                                     ("loss_mean", -1, 0.0 * time, loss, loss)):
                for mode in ("control", "others"):
                    noise = rng.normal(0, 1, (2, len(STEPS)))
                    rows += [{"zoo": zoo, "mode": mode, "group": group, "metric": metric, "step": int(step),
                              "memorization_step": 100.0, "direction": sign, "level": level[i],
                              "did": did[i] - did[0] + noise[0, i], "se": 1.0, "z": np.nan,
                              "change": change[i] - change[0] + noise[1, i], "self_se": 1.0, "self_z": np.nan}
                             for i, step in enumerate(STEPS)]
    return pd.DataFrame(rows), pd.DataFrame(truth)


def test_detector_evaluation_against_the_baselines():
    contrast, truth = synthetic_contrast()
    tables = evaluate_detectors(contrast, truth, StudyConfig(control="canary"))
    detector = tables["detector"].set_index(["detector", "form", "split"])
    tracker = detector.loc[("mean_cos_answer", "canary", "all")]
    assert tracker["misses"] == 0 and tracker["false_alarms"] == 0 and tracker["groups"] == 12  # canary unscored
    assert (tables["detector"]["knowledge"] == "told only: never fire in the canary group").sum() > 0
    compared = tables["comparisons"].set_index(["detector", "form", "split", "baseline"])
    for baseline in (f"{STEP_MEAN} | baseline", f"{SILENT} | baseline", f"{LOSS_SPIKE} | baseline",
                     "loss_mean | canary"):
        assert compared.loc[("mean_cos_answer", "canary", "all", baseline), "verdict"] == "better than", baseline
    step = detector.loc[(STEP_MEAN, "baseline", "all")]
    assert step["false_alarms"] == 6  # it fires wherever training goes on, but never in the canary
    assert detector.loc[(SILENT, "baseline", "all"), "cost"] == 300 * 6 / 12
    for form in ("canary", "others", "self"):  # a function of time never passes
        rows = compared.loc[("pathway_length", form, "all")]
        assert (rows["verdict"] != "better than").all(), form
    assert {"family: f", "family: g"} <= set(tables["detector"]["split"])
    assert "mul" in set(tables["detector"]["form"])  # the labelled extra
    extra = tables["detector"][tables["detector"]["form"] == "mul"]
    assert extra["knowledge"].str.contains("test knowledge").all() and not extra["headline"].any()
    sensitivity = tables["sensitivity"]
    assert set(sensitivity["miss_cost"]) == {100.0, 200.0, 300.0, 400.0, 600.0}
    assert tables["detector"]["variants_tried"].iloc[0] == 3 * 4  # 3 metrics x 4 forms
    rules = tables["calibrated_rules"].set_index("name")
    assert rules.loc["step only", "kind"] == "constant" and rules.loc["training loss, same rule", "kind"] == "threshold"


def test_trajectory_noise_keeps_a_jittery_null_quiet():
    """No effect, checkpoint jitter the size of the sample noise: with the run's noise in the z,
    z >= 2 twice in a row is rare; with the sample bootstrap alone it is common."""
    from moegrok.analysis.contrast import with_trajectory_noise

    rng = np.random.default_rng(1)
    fired = {"z": 0, "z_samples": 0}
    for run in range(20):
        rows = [{"zoo": run, "mode": "others", "metric": "m", "group": g, "step": s, "direction": 1,
                 "did": rng.normal(0, 1.0) if s else 0.0, "se": 0.1, "z": np.nan, "change": 0.0, "self_se": 0.1,
                 "self_z": np.nan} for g in ("a", "b", "c") for s in range(0, 1000, 50)]
        table = with_trajectory_noise(pd.DataFrame(rows))
        table["z_samples"] = table["did"] / table["se"]
        for column in fired:
            above = (table.sort_values("step").groupby("group")[column]
                     .apply(lambda z: ((z >= 2) & (z.shift() >= 2)).any()))
            fired[column] += int(above.any())
    assert fired["z_samples"] >= 15 and fired["z"] <= 6


def test_collapse_is_read_from_the_training_log():
    steps = np.arange(0, 600, 25)
    log = pd.concat([pd.DataFrame({"step": steps, "group": group, "train_acc": np.where(steps >= 100, 1.0, 0.5),
                                   "train_loss": 0.01, "heldout_acc": np.where(steps >= 400, 0.95, 0.05)})
                     for group in ("add", "mul")], ignore_index=True)
    truth = pd.DataFrame({"group": ["add", "mul"], "memorization_step": 100.0, "status": ["grokking", "never"]})
    assert not zoo_dynamics(log, truth)["collapse"]
    collapsed = log.copy()
    collapsed.loc[(collapsed["step"] == 350), ["train_acc", "train_loss"]] = [0.07, 5.0]
    dynamics = zoo_dynamics(collapsed, truth)
    assert dynamics["collapse"] and dynamics["min_train_acc"] == 0.07 and dynamics["loss_jumps"] == 2
    late = log.copy()
    late.loc[(late["step"] == 500) & (late["group"] == "add"), "train_acc"] = 0.5  # after generalizing: no matter
    assert not zoo_dynamics(late, truth)["collapse"]


def test_study_smoke_config_runs_end_to_end(tmp_path, ray_cluster):
    findings = tmp_path / "findings"
    (tmp_path / "findings.md").write_text("# Findings\n\nprose kept\n")
    cfg = compose_config("study_smoke", [f"out_dir={tmp_path / 'study'}", f"zoo_dir={tmp_path / 'zoo'}",
                                         f"findings_dir={findings}"])
    tables = run_study(cfg)
    out = tmp_path / "study"
    assert list(tables["study"].columns) == STUDY_COLUMNS
    assert len(tables["zoos"]) == 2
    assert {"control", "others", "self"} == set(tables["contrast"]["mode"])
    references = tables["contrast"].loc[tables["contrast"]["mode"] == "control", "reference"]
    assert set(references) == {"canary", "others"}
    assert {"mean_cos_answer", "pathway_distance_answer", "loss_mean", "med"} <= set(tables["contrast"]["metric"])
    assert {"z_samples", "trajectory_se"} <= set(tables["contrast"].columns)
    detector = tables["detector"]
    assert {STEP_MEAN, LOSS_SPIKE, SILENT, "mean_cos_answer"} <= set(detector["detector"])
    assert not tables["groups_scored"].loc[tables["groups_scored"]["group"] == "canary", "scored"].any()
    for name in ("zoos", "groups", "contrast", "contrast_summary", "detector", "comparisons", "study"):
        assert pd.read_parquet(out / f"{name}.parquet").shape == tables[name].shape, name
    page = (out / "study.html").read_text()
    assert "Detectors vs baselines" in page and "Between-group contrast" in page
    assert (out / "tiny-s0" / "report.html").exists() and (out / "tiny-s0" / "contrast.parquet").exists()
    verdicts = pd.read_parquet(out / "tiny-s0" / "verdicts.parquet")  # the shipped rules, per group
    assert set(verdicts["group"]) == {"add", "sub", "canary"} and verdicts["verdict"].notna().all()
    assert {p.name for p in findings.glob("*.csv")} == {"zoos.csv", "groups.csv", "main.csv", "comparisons.csv",
                                                        "sensitivity.csv", "variants.csv",
                                                        "calibrated_rules.csv"}
    text = (tmp_path / "findings.md").read_text()
    assert "prose kept" in text and "always silent (baseline)" in text


def test_a_typo_in_a_zoo_override_fails_before_training(tmp_path):
    cfg = StudyConfig(out_dir=str(tmp_path), zoo_dir=str(tmp_path / "zoo"),
                      zoos=[StudyZooConfig("bad", overrides={"model.num_expert": 16}, role="calibration"),
                            StudyZooConfig("good")])
    with pytest.raises(Exception, match="num_expert"):
        run_study(cfg)
    assert not (tmp_path / "zoo").exists()


def test_a_study_needs_two_zoos():
    with pytest.raises(ValueError, match="at least two zoos"):
        StudyConfig(zoos=[StudyZooConfig("only")])
