import pytest
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moegrok.routing.families import ADAPTERS, REFUSED, register_adapter
from moegrok.routing.recorder import RoutingRecorder
from tests.reference.models import LOADED_AS_TEXT, MOE_FAMILIES, moe_causal_lm_types, save_remote_moe, tiny_moe_config
from tests.reference.moe_adapter_example import remote_moe_adapter


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


def test_register_adapter_covers_a_family_in_this_process(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_remote_moe(tmp_path / "m"), trust_remote_code=True)
    register_adapter("remote_moe", remote_moe_adapter())
    try:
        assert RoutingRecorder(model).num_layers == 3
    finally:
        del ADAPTERS["remote_moe"]
