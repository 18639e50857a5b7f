import numpy as np
import pandas as pd
import pytest

from moegrok.analysis.calibration import LOSS_SPIKE, STEP_LAG, STEP_MEAN, STEP_ONLY
from moegrok.config import StudyConfig, StudyZooConfig, compose_config
from moegrok.study.detection import evaluate_detectors, zoo_dynamics
from moegrok.study.run import STUDY_COLUMNS, run_study

STEPS = np.arange(100, 950, 50)
# zoo -> (role, {group: accuracy onset or None}); every group memorizes at step 100, all collapse at 350
ZOOS = {"cal-0": ("calibration", {"add": 400, "sub": 550, "mul": None}),
        "cal-1": ("calibration", {"add": 450, "sub": 600, "mul": None}),
        "eval-0": ("evaluation", {"add": 400, "sub": 650, "mul": None}),
        "eval-never": ("evaluation", {"add": None, "sub": None, "mul": None})}


def synthetic_contrast(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A contrast table with three metrics: a tracker (rises in a group after its accuracy onset),
    a function of time (rises in every group alike), and the training loss (spikes at the shared
    collapse in every group)."""
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    for zoo, (role, groups) in ZOOS.items():
        for group, onset in groups.items():
            truth.append({"zoo": zoo, "group": group, "role": role, "collapse": True,
                          "status": "grokking" if onset else "never", "accuracy_onset": onset or np.nan})
            own = np.where((onset or 10_000) < STEPS, 12.0, 0.0)
            time = (STEPS - 100) / 40
            loss = np.where(STEPS == 350, 5.0, 0.02)
            for metric, z, self_z, level in (("mean_cos_answer", own, own, own),
                                             ("pathway_length", 0.0 * time, time, time),
                                             ("loss_mean", 0.0 * time, -loss, loss)):
                for mode in ("control", "others"):
                    noise = rng.normal(0, 1, (2, len(STEPS)))
                    rows += [{"zoo": zoo, "mode": mode, "group": group, "metric": metric, "step": int(step),
                              "memorization_step": 100.0, "level": level[i], "z": z[i] + noise[0, i],
                              "self_z": self_z[i] + noise[1, i]} for i, step in enumerate(STEPS)]
    return pd.DataFrame(rows), pd.DataFrame(truth)


def test_detector_evaluation_against_the_baselines():
    contrast, truth = synthetic_contrast()
    tables = evaluate_detectors(contrast, truth, StudyConfig(control="mul"))
    detector = tables["detector"].set_index(["detector", "form", "split"])
    tracker = detector.loc[("mean_cos_answer", "control", "evaluation: all")]
    assert tracker["misses"] == 0 and tracker["false_alarms"] == 0 and tracker["onset_mae"] <= 50
    assert tracker["beats_all_baselines"]
    spike = detector.loc[(LOSS_SPIKE, "baseline", "evaluation: all")]
    assert spike["false_alarms"] >= 4  # the collapse is in every group, mul and the never zoo included
    step = detector.loc[(STEP_MEAN, "baseline", "evaluation: all")]
    assert step["false_alarms"] == 4 and step["rule"] == "onset at step 500"  # fires wherever training goes on
    assert detector.loc[(STEP_LAG, "baseline", "evaluation: all"), "rule"].endswith("steps after memorization")
    for form in ("control", "others", "self"):  # a function of time never passes
        time_only = detector.loc[("pathway_length", form, "evaluation: all")]
        assert not time_only["beats_all_baselines"], form
    assert detector.loc[("pathway_length", "self", "evaluation: all"), "false_alarms"] == 4
    contrast_time = detector.loc[("pathway_length", "control", "evaluation: all")]  # the contrast cancels time
    assert contrast_time["false_alarms"] == 0 and contrast_time["misses"] == 2
    assert set(tables["calibration"]["detector"]) >= {"mean_cos_answer", LOSS_SPIKE}


def test_evaluation_zoos_never_change_the_calibrated_rules():
    contrast, truth = synthetic_contrast()
    first = evaluate_detectors(contrast, truth, StudyConfig(control="mul"))
    evaluation = contrast["zoo"].str.startswith("eval")
    scrambled = contrast.assign(z=contrast["z"].where(~evaluation, -contrast["z"] * 7),
                                level=contrast["level"].where(~evaluation, 0.0))
    second = evaluate_detectors(scrambled, truth, StudyConfig(control="mul"))
    pd.testing.assert_frame_equal(first["calibration"], second["calibration"])
    rules = [table[table["split"] == "evaluation: all"].set_index(["detector", "form"])["rule"]
             for table in (first["detector"], second["detector"])]
    pd.testing.assert_series_equal(rules[0], rules[1])


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
    cfg = compose_config("study_smoke", [f"out_dir={tmp_path / 'study'}", f"zoo_dir={tmp_path / 'zoo'}"])
    tables = run_study(cfg)
    out = tmp_path / "study"
    assert list(tables["study"].columns) == STUDY_COLUMNS
    assert set(tables["zoos"]["role"]) == {"calibration", "evaluation"} and len(tables["zoos"]) == 2
    assert {"control", "others", "self"} == set(tables["contrast"]["mode"])
    assert {"mean_cos_answer", "pathway_distance_answer", "loss_mean", "med"} <= set(tables["contrast"]["metric"])
    detector = tables["detector"]
    assert {*STEP_ONLY[1:], LOSS_SPIKE, "mean_cos_answer"} <= set(detector["detector"])
    assert detector["split"].str.startswith("evaluation").any()
    for name in ("zoos", "groups", "contrast", "contrast_summary", "detector", "detections", "calibration", "study"):
        assert pd.read_parquet(out / f"{name}.parquet").shape == tables[name].shape, name
    page = (out / "study.html").read_text()
    assert "Detector vs baselines" in page and "Between-group contrast" in page
    assert (out / "tiny-s0" / "report.html").exists() and (out / "tiny-s0" / "contrast.parquet").exists()


def test_a_typo_in_a_zoo_override_fails_before_training(tmp_path):
    cfg = StudyConfig(out_dir=str(tmp_path), zoo_dir=str(tmp_path / "zoo"),
                      zoos=[StudyZooConfig("bad", overrides={"model.num_expert": 16}, role="calibration"),
                            StudyZooConfig("good")])
    with pytest.raises(Exception, match="num_expert"):
        run_study(cfg)
    assert not (tmp_path / "zoo").exists()


def test_a_study_needs_both_roles():
    with pytest.raises(ValueError, match="at least one calibration and one evaluation zoo"):
        StudyConfig(zoos=[StudyZooConfig("only")])
