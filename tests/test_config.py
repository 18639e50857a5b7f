import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from moegrok.config import CONF_DIR as CONF
from moegrok.config import PretrainToyConfig, SweepConfig, register_configs

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUP_OPTIONS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml"))
                 for g in ("model", "checkpoints", "samples", "eval", "tune", "cluster")}


@pytest.fixture(autouse=True, scope="module")
def hydra_conf():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def to_object(name: str, overrides: list[str]):
    return OmegaConf.to_object(compose(config_name=name, overrides=overrides))


def test_default_configs_resolve():
    assert isinstance(to_object("pretrain_toy", []), PretrainToyConfig)
    sweep = to_object("sweep", [])
    assert isinstance(sweep, SweepConfig)
    assert sweep.checkpoints.dir is None and sweep.samples.paths == [] and sweep.model.residue_tokens == 0
    toy = to_object("sweep", ["experiment=toy"])
    assert toy.checkpoints.dir == "zoo/default" and toy.samples.paths == ["zoo/default/samples.jsonl"]
    assert toy.eval.benchmarks[0].path == "zoo/default/benchmark.jsonl" and toy.eval.engine == "auto"


def leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a YAML mapping, the defaults list left out."""
    for key, value in node.items():
        if key == "defaults":
            continue
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for index, entry in enumerate(value):
                yield from leaves(entry, f"{prefix}{key}.{index}.")
        elif "${" not in str(value):  # an interpolation resolves in the whole config only
            yield f"{prefix}{key}", value


def assert_applied(composed, values: dict, prefix: str = "") -> None:
    """Every value the YAML file sets is what the composed config holds."""
    plain = OmegaConf.to_container(OmegaConf.structured(composed), resolve=True, enum_to_str=True)
    for key, value in leaves(values):
        assert OmegaConf.select(OmegaConf.create(plain), prefix + key) == value, (prefix + key, value)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_resolves_and_applies_its_values(experiment):
    config = to_object("sweep", [f"experiment={experiment}"])
    assert isinstance(config, SweepConfig)
    assert_applied(config, OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, options in GROUP_OPTIONS.items() for o in options])
def test_every_group_option_resolves_and_applies_its_values(group, option):
    config = to_object("sweep", [f"{group}={option}"])
    assert isinstance(config, SweepConfig)
    assert_applied(config, OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml")), f"{group}.")


def test_olmoe_experiment_is_the_paper_protocol():
    config = to_object("sweep", ["experiment=olmoe_1b_7b"])
    assert config.checkpoints.repo == "allenai/OLMoE-1B-7B-0924" and config.checkpoints.num_evenly_spaced == 10
    assert config.samples.groups == ["math", "code", "commonsense", "domain"]
    assert len(config.eval.benchmarks) == 4 and config.metrics.weight_share == 0.7


def test_typo_key_fails_at_start_up_naming_it():
    with pytest.raises(ConfigCompositionException, match="threshhold"):
        compose(config_name="sweep", overrides=["metrics.threshhold=0.5"])
    with pytest.raises(ConfigCompositionException, match="max_step"):
        compose(config_name="pretrain_toy", overrides=["train.max_step=5"])


def test_bad_values_fail_at_start_up_naming_the_key():
    with pytest.raises(ValueError, match="metrics.weight_share=1.5"):
        to_object("sweep", ["metrics.weight_share=1.5"])
    with pytest.raises(ValueError, match="data.p=48"):
        to_object("pretrain_toy", ["data.p=48"])
    with pytest.raises(ConfigCompositionException, match="stage=recod") as error:
        compose(config_name="sweep", overrides=["stage=recod"])
    assert "expected one of [all, record, reduce" in str(error.value.__cause__)
    with pytest.raises(ValueError, match="record.num_actors=0"):
        to_object("sweep", ["record.num_actors=0"])
    with pytest.raises(ValueError, match="eval.max_new_tokens=0"):
        to_object("sweep", ["eval.max_new_tokens=0"])
    with pytest.raises(ValueError, match="weight_shares"):
        to_object("study", ["weight_shares=[0.5,1.5]"])
    with pytest.raises(ValueError, match=r"analysis.sample_set='memorized': expected one of metrics.sample_sets"):
        to_object("sweep", ["metrics.sample_sets=[all]", "analysis.sample_set=memorized"])
    with pytest.raises(ValueError, match=r"cluster.sync_uri='s3://b/copy': expected null when run_dir='s3://b/run'"):
        to_object("sweep", ["run_dir=s3://b/run", "cluster.sync_uri=s3://b/copy"])
    with pytest.raises(ValueError, match=r"storage.lease_ttl_s=1.0: expected >= 3"):
        to_object("sweep", ["storage.lease_ttl_s=1"])


def test_storage_credentials_never_reach_the_run_dir_config():
    from moegrok.config import config_yaml

    cfg = to_object("sweep", ["run_dir=s3://b/run", "+storage.options.endpoint_url=http://minio:9000",
                              "+storage.options.key=AKIA", "+storage.options.secret=shh"])
    assert cfg.storage.options["secret"] == "shh"  # the sweep uses them
    text = config_yaml(cfg)
    assert "http://minio:9000" in text and "AKIA" not in text and "shh" not in text


def test_tuned_experiments_turn_the_tune_stage_on():
    olmoe = to_object("sweep", ["experiment=olmoe_1b_7b_tuned"])
    assert olmoe.tune.enabled and olmoe.tune.method == "lora" and olmoe.tune.rank == 32 and olmoe.tune.lr == 5e-5
    assert olmoe.tune.epochs == 3 and olmoe.checkpoints.repo == "allenai/OLMoE-1B-7B-0924"
    assert not to_object("sweep", []).tune.enabled and not to_object("sweep", ["experiment=olmoe_1b_7b"]).tune.enabled
    assert to_object("sweep", ["experiment=toy_tuned"]).tune.enabled


@pytest.mark.parametrize("name", ["study", "study_smoke"])
def test_study_configs_resolve(name):
    from moegrok.config import StudyConfig

    study = to_object(name, [])
    assert isinstance(study, StudyConfig) and study.zoos
    assert sum(len(zoo.seeds) for zoo in study.zoos) >= 2  # each zoo is scored with rules calibrated on the others
    assert not study.base.train.live_metrics.enabled
