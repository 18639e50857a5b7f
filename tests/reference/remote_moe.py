"""A model family outside transformers, whose code travels with its checkpoints (trust_remote_code):
a Mixtral under the model_type `remote_moe`, so moegrok has no built-in adapter for it."""

from transformers import MixtralConfig, MixtralForCausalLM


class RemoteMoeConfig(MixtralConfig):
    model_type = "remote_moe"


class RemoteMoeForCausalLM(MixtralForCausalLM):
    config_class = RemoteMoeConfig
