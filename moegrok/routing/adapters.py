"""How moegrok reads an MoE family's routing: `MoeAdapter` (built-in ones: moegrok/routing/families.py).

An adapter names, inside each decoder layer, the module whose call carries that layer's routing
(the router, or the experts module where the router returns only logits) and a reader that
turns the call into (top-k expert ids, top-k weights) per token: exactly the experts and weights
the layer mixes. The recorder checks every read at run time, so a reader that picks the wrong
output fails with an error instead of storing it.

A family outside the built-ins: write a function that returns a MoeAdapter and name it in the
config, `model.adapter=package.module:function`; every record actor imports it by that name
(`load_adapter`). `moegrok.families.register_adapter` adds one to this process only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moegrok.errors import UnsupportedModelError

Reader = Callable[[nn.Module, tuple, dict, Any], tuple[torch.Tensor, torch.Tensor]]


def router_output(*, ids: int, weights: int) -> Reader:
    """A router whose forward returns a tuple with the top-k ids and weights at these positions."""

    def read(module, args, kwargs, output):
        return output[ids], output[weights]

    return read


LOGITS_WEIGHTS_IDS = router_output(weights=1, ids=2)  # transformers' common router contract
IDS_WEIGHTS_LOGITS = router_output(ids=0, weights=1)  # GraniteMoe, GraniteMoeShared/Hybrid, Aria


def experts_input(module, args, kwargs, output):
    """The call `experts(hidden_states, top_k_index, top_k_weights)`, for routers that return logits only."""
    top_k_index = kwargs["top_k_index"] if "top_k_index" in kwargs else args[1]
    top_k_weights = kwargs["top_k_weights"] if "top_k_weights" in kwargs else args[2]
    return top_k_index, top_k_weights


def config_int(name: str) -> Callable[[Any], int]:
    """A config value such as the expert count; per-layer lists must hold one value."""

    def get(config) -> int:
        value = getattr(config, name)
        if isinstance(value, list | tuple):
            if len(set(value)) != 1:
                raise UnsupportedModelError(f"config.{name}={value}: varies by layer; moegrok records one "
                                            "number of experts and one top-k per model")
            value = value[0]
        return int(value)

    return get


def parameter(path: str) -> Callable[[nn.Module], torch.Tensor]:
    """The (E, D) expert-embedding rows at `path` inside a decoder layer."""
    return lambda layer: layer.get_parameter(path)


def unnormalized(config) -> None:
    """weight_sum of a family whose top-k weights need not sum to a constant."""
    return None


NUM_LOCAL_EXPERTS = config_int("num_local_experts")
NUM_EXPERTS_PER_TOK = config_int("num_experts_per_tok")


def lm_head_logits(model: nn.Module, hidden_ND: torch.Tensor) -> torch.Tensor:
    """Logits as most ForCausalLM compute them: the output embedding of the hidden states."""
    return model.get_output_embeddings()(hidden_ND)


@dataclass(frozen=True)
class MoeAdapter:
    """How to read one family's routing (see the module docstring).

    hook: module path inside a decoder layer whose call carries the routing; layers without it are dense.
    read: (module, args, kwargs, output) of that call -> (ids_NK integer, weights_NK) for its N tokens.
    expert_rows: decoder layer -> (E, D) expert embeddings for pathway consistency; None: consistency is NaN.
    num_experts, top_k: read from the config (E, K).
    weight_sum: the per-token sum of the top-k weights where the family normalizes them, else None.
    lm_logits: (model, hidden_ND) -> logits_NV the way the family's ForCausalLM computes them.
    decoder, layers: the decoder module and the name of its list of layers.
    pad_free: the family's forward changes with right padding: batch only samples of equal length.
    """

    hook: str
    read: Reader = LOGITS_WEIGHTS_IDS
    expert_rows: Callable[[nn.Module], torch.Tensor] | None = None
    num_experts: Callable[[Any], int] = NUM_LOCAL_EXPERTS
    top_k: Callable[[Any], int] = NUM_EXPERTS_PER_TOK
    weight_sum: Callable[[Any], float | None] = unnormalized
    lm_logits: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lm_head_logits
    decoder: Callable[[nn.Module], nn.Module] = lambda model: model.get_decoder()
    layers: str = "layers"
    pad_free: bool = False

    def moe_layers(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """(layer index, decoder layer) of every layer that has the hooked module, in order."""
        out = []
        for index, layer in enumerate(getattr(self.decoder(model), self.layers)):
            try:
                layer.get_submodule(self.hook)
            except AttributeError:
                continue
            out.append((index, layer))
        return out

    def routers(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """(layer index, hooked module) of every MoE layer, in order."""
        return [(index, layer.get_submodule(self.hook)) for index, layer in self.moe_layers(model)]


def load_adapter(spec: str) -> MoeAdapter:
    """The adapter returned by the function named `package.module:function`."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"model.adapter={spec!r}: expected package.module:function")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model.adapter={spec!r}: cannot import it ({type(e).__name__}: {e}); the module must be "
                         "importable on every Ray node") from e
    adapter = factory()
    if not isinstance(adapter, MoeAdapter):
        raise TypeError(f"model.adapter={spec!r} returned {type(adapter).__name__}, expected a MoeAdapter")
    return adapter
