import pytest
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moegrok.adapters import ADAPTERS, REFUSED, MoeAdapter, load_adapter
from moegrok.config import ModelConfig
from tests.helpers import LOADED_AS_TEXT, MOE_FAMILIES, moe_causal_lm_types, tiny_moe_config


def test_every_moe_causal_lm_of_transformers_is_supported_or_refused():
    moe_types = moe_causal_lm_types()
    assert len(moe_types) > 40
    uncovered = [t for t in moe_types if t not in ADAPTERS and t not in REFUSED and t not in LOADED_AS_TEXT]
    assert not uncovered, f"MoE causal LMs with neither an adapter nor a refusal: {uncovered}"
    assert set(ADAPTERS) == set(MOE_FAMILIES)  # every built-in adapter has a tiny model in the sweep test


@pytest.mark.parametrize(("model_type", "text_type"), LOADED_AS_TEXT.items())
def test_vision_language_configs_load_as_their_text_model(model_type, text_type, tmp_path):
    config = CONFIG_MAPPING[model_type](text_config=tiny_moe_config(text_type, 32).to_dict())
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.model_type == text_type


def test_load_adapter_imports_the_named_function():
    adapter = load_adapter("tests.moe_adapter_example:remote_moe_adapter")
    assert isinstance(adapter, MoeAdapter) and adapter.hook == "mlp.gate"


@pytest.mark.parametrize(("spec", "error", "match"), [
    ("tests.moe_adapter_example", ValueError, r"model\.adapter='tests\.moe_adapter_example': expected package"),
    ("tests.no_such_module:f", ValueError, r"cannot import it \(ModuleNotFoundError.*every Ray node"),
    ("tests.moe_adapter_example:missing", ValueError, r"cannot import it \(AttributeError"),
    ("os:getcwd", TypeError, r"model\.adapter='os:getcwd' returned str, expected a MoeAdapter"),
])
def test_load_adapter_errors_name_the_value(spec, error, match):
    with pytest.raises(error, match=match):
        load_adapter(spec)


def test_model_config_adapter_key_and_attention_default():
    assert ModelConfig().attn_implementation == ""  # transformers chooses
    assert ModelConfig(adapter="pkg.mod:make").adapter == "pkg.mod:make"
    with pytest.raises(ValueError, match=r"config key model\.adapter='pkg\.mod': expected package\.module:function"):
        ModelConfig(adapter="pkg.mod")
