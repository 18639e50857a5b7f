import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moegrok.config import register_configs
from moegrok.study import STUDY_COLUMNS, best_variant, meets_target, run_study
from tests.test_config import CONF


@pytest.mark.slow
def test_study_smoke_config_runs_end_to_end(tmp_path, ray_cluster):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="study_smoke", overrides=[
            f"out_dir={tmp_path / 'study'}", f"zoo_dir={tmp_path / 'zoo'}"]))
    study = run_study(cfg)
    assert list(study.columns) == STUDY_COLUMNS
    assert set(study["variant"]) == {"default", "topk1"}
    assert set(study["threshold"]) == {0.5, 0.7} and set(study["sample_set"]) == {"memorized", "all"}
    assert {"pathway_distance", "pathway_distance_answer", "mean_cos", "step", "loss_mean"} <= set(study["metric"])
    assert (tmp_path / "study" / "study.html").exists()
    assert pd.read_parquet(tmp_path / "study" / "study.parquet").shape == study.shape


def test_best_variant_and_target():
    rows = pd.DataFrame({
        "variant": ["a", "a", "b", "b"], "seed": 0, "threshold": 0.7, "sample_set": "memorized",
        "group": ["x", "y", "x", "y"], "metric": "pathway_distance", "n": 10,
        "spearman": [-0.96, -0.5, -0.97, -0.99], "partial_spearman": [-0.6, -0.1, -0.7, -0.8],
        "lead_steps": [0, 0, 100, 0], "beats_baselines": [True, False, True, True], "grokked": True,
    })
    assert meets_target(rows, 0.95).tolist() == [True, False, True, True]
    assert best_variant(rows, 0.95) == "b"


def test_a_typo_in_a_variant_override_fails_before_training(tmp_path):
    from moegrok.config import StudyConfig, StudyVariantConfig

    cfg = StudyConfig(out_dir=str(tmp_path), zoo_dir=str(tmp_path / "zoo"),
                      variants=[StudyVariantConfig("bad", overrides={"model.num_expert": 16})])
    with pytest.raises(Exception, match="num_expert"):
        run_study(cfg)
    assert not (tmp_path / "zoo").exists()
