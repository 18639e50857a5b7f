import pytest

from moegrok.config import ModelConfig
from moegrok.routing.adapters import MoeAdapter, load_adapter


def test_load_adapter_imports_the_named_function():
    adapter = load_adapter("tests.reference.moe_adapter_example:remote_moe_adapter")
    assert isinstance(adapter, MoeAdapter) and adapter.hook == "mlp.gate"


@pytest.mark.parametrize(("spec", "error", "match"), [
    ("tests.reference.moe_adapter_example", ValueError,
     r"model\.adapter='tests\.reference\.moe_adapter_example': expected package"),
    ("tests.no_such_module:f", ValueError, r"cannot import it \(ModuleNotFoundError.*every Ray node"),
    ("tests.reference.moe_adapter_example:missing", ValueError, r"cannot import it \(AttributeError"),
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
