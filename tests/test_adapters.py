import re
from pathlib import Path

import pytest
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from moegrok.adapters import ADAPTERS, REFUSED, MoeAdapter, load_adapter
from moegrok.config import ModelConfig
from tests.helpers import MOE_FAMILIES, tiny_moe_config

# vision-language configs that AutoModelForCausalLM loads as their text model
LOADED_AS_TEXT = {"llama4": "llama4_text", "qwen3_5_moe": "qwen3_5_moe_text", "qwen4_exp": "qwen4_exp_text"}


def moe_causal_lm_types() -> list[str]:
    """The causal-LM model types of the installed transformers whose modeling code reports router logits."""
    models = Path(transformers.__file__).parent / "models"
    found = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        module = model_type_to_module_name(model_type)
        source = models / module / f"modeling_{module}.py"
        if source.exists() and re.search(r'"router_logits":\s*(OutputRecorder|\[)', source.read_text()):
            found.append(model_type)
    return found


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
