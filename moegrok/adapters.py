"""Where and how moegrok reads each MoE family's routing: `MoeAdapter` and the built-in `ADAPTERS`.

An adapter names, inside each decoder layer, the module whose call carries that layer's routing
(the router, or the experts module where the router returns only logits) and a reader that
turns the call into (top-k expert ids, top-k weights) per token: exactly the experts and weights
the layer mixes. The recorder checks every read at run time, so a reader that picks the wrong
output fails with an error instead of storing it.

A family outside the built-ins: write a function that returns a MoeAdapter and name it in the
config, `model.adapter=package.module:function`; every record actor imports it by that name.
`register_adapter` adds one to this process only (notebooks, the live monitor).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Reader = Callable[[nn.Module, tuple, dict, Any], tuple[torch.Tensor, torch.Tensor]]


class UnsupportedModelError(ValueError):
    """A model moegrok cannot record; the message names its class and what to do."""


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


def llama4_router(module, args, kwargs, output):
    """Llama4Router returns (scores_NE: sigmoid of the top-k logits, 0 elsewhere; logits_NE)."""
    scores_NE, logits_NE = output
    ids_NK = logits_NE.topk(module.top_k, dim=-1).indices  # the router's own selection, same call
    return ids_NK, scores_NE.gather(-1, ids_NK)


def jetmoe_gating(module, args, kwargs, output):
    """JetMoeTopKGating returns its choices grouped by expert; undo the grouping."""
    slot_order, _, gates_sorted, expert_size, logits_NE = output
    num_slots = logits_NE.shape[0] * module.top_k
    device = slot_order.device
    expert_of_sorted = torch.repeat_interleave(torch.arange(len(expert_size), device=device),
                                               torch.tensor(expert_size, device=device))
    ids = torch.empty(num_slots, dtype=torch.long, device=device).index_put_((slot_order,), expert_of_sorted)
    weights = torch.empty(num_slots, dtype=gates_sorted.dtype, device=device).index_put_((slot_order,), gates_sorted)
    return ids.view(-1, module.top_k), weights.view(-1, module.top_k)


def zaya_router(module, args, kwargs, output):
    """ZayaRouter returns (logits, weights, ids, router state); a choice of its skip expert (no
    computation) comes as expert 0 with weight 0. Record it as expert E, the skip."""
    _, weights_NK, ids_NK, _ = output
    return ids_NK.masked_fill(weights_NK == 0, module.num_experts), weights_NK


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


def _unnormalized(config) -> None:
    return None


def _one(config) -> float:
    return 1.0


def _one_if(flag: str) -> Callable[[Any], float | None]:
    return lambda config: 1.0 if getattr(config, flag) else None


def _scale(name: str, *, if_flag: str | None = None) -> Callable[[Any], float | None]:
    """Weights normalized to sum to 1, then multiplied by config.<name> (if config.<if_flag>)."""
    return lambda config: float(getattr(config, name)) if if_flag is None or getattr(config, if_flag) else None


NUM_LOCAL_EXPERTS = config_int("num_local_experts")
NUM_EXPERTS_PER_TOK = config_int("num_experts_per_tok")


def _lm_head(model: nn.Module, hidden_ND: torch.Tensor) -> torch.Tensor:
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
    weight_sum: Callable[[Any], float | None] = _unnormalized
    lm_logits: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _lm_head
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


def _granite_logits(model, hidden_ND):
    return _lm_head(model, hidden_ND) / model.config.logits_scaling


def _cohere_logits(model, hidden_ND):
    return _lm_head(model, hidden_ND) * model.logit_scale


def _gemma4_logits(model, hidden_ND):
    logits_NV, cap = _lm_head(model, hidden_ND), model.config.final_logit_softcapping
    return logits_NV if cap is None else torch.tanh(logits_NV / cap) * cap


def _inkling_logits(model, hidden_ND):
    logits_NV = _lm_head(model, hidden_ND / model.config.logits_mup_width_multiplier)
    return logits_NV[..., : model.config.unpadded_vocab_size or logits_NV.shape[-1]]


def _inkling_rows(layer):
    gate = layer.mlp.gate
    return gate.weight[: gate.num_experts]  # the rows after them score the shared experts


def _deepseek_v3_like(**overrides) -> MoeAdapter:
    """Sigmoid scores + correction bias, group-limited top-k, optional renormalization, scaling."""
    fields = dict(hook="mlp.gate", expert_rows=parameter("mlp.gate.weight"), num_experts=config_int("n_routed_experts"),
                  weight_sum=_scale("routed_scaling_factor", if_flag="norm_topk_prob"))
    return MoeAdapter(**{**fields, **overrides})


def _gate(hook: str = "mlp.gate", **fields) -> MoeAdapter:
    """A router at `hook` with the common output and its `.weight` as the expert rows."""
    return MoeAdapter(hook=hook, **{"expert_rows": parameter(f"{hook}.weight"), **fields})


def _granite(read: Reader) -> MoeAdapter:
    return _gate("block_sparse_moe.router", read=read, weight_sum=_one, lm_logits=_granite_logits)


ADAPTERS: dict[str, MoeAdapter] = {
    # softmax over all experts, top-k, optionally renormalized
    "olmoe": _gate(num_experts=config_int("num_experts"), weight_sum=_one_if("norm_topk_prob")),
    "flex_olmo": _gate(num_experts=config_int("num_experts"), weight_sum=_one_if("norm_topk_prob")),
    "mellum": _gate(num_experts=config_int("num_experts"), weight_sum=_one_if("norm_topk_prob")),
    "qwen2_moe": _gate(num_experts=config_int("num_experts"), weight_sum=_one_if("norm_topk_prob")),
    "qwen3_moe": _gate(num_experts=config_int("num_experts"), weight_sum=_one_if("norm_topk_prob")),
    "qwen3_next": _gate(num_experts=config_int("num_experts"), weight_sum=_one_if("norm_topk_prob")),
    "qwen4_exp_text": _gate(num_experts=config_int("num_experts"), weight_sum=_one_if("norm_topk_prob")),
    "qwen3_5_moe_text": _gate(num_experts=config_int("num_experts"), weight_sum=_one),
    "mixtral": _gate(weight_sum=_one),
    "minimax": _gate(weight_sum=_one),
    "hunyuan_v1_moe": MoeAdapter("mlp.gate", expert_rows=parameter("mlp.gate.wg.weight"),
                                 num_experts=config_int("num_experts"), top_k=config_int("moe_topk"), weight_sum=_one),
    "deepseek_v2": _gate(num_experts=config_int("n_routed_experts")),
    "ernie4_5_moe": _gate(num_experts=config_int("moe_num_experts"), top_k=config_int("moe_k"), weight_sum=_one),
    # top-k of the logits, softmax over the k
    "granitemoe": _granite(IDS_WEIGHTS_LOGITS),
    "granitemoeshared": _granite(IDS_WEIGHTS_LOGITS),
    "granitemoehybrid": _granite(IDS_WEIGHTS_LOGITS),
    "granitemoe_swa": _granite(LOGITS_WEIGHTS_IDS),
    "aria_text": _gate("mlp.router", read=IDS_WEIGHTS_LOGITS, num_experts=config_int("moe_num_experts"),
                       top_k=config_int("moe_topk"), weight_sum=_one),
    "gpt_oss": _gate("mlp.router", weight_sum=_one),
    "jetmoe": MoeAdapter("mlp.router", read=jetmoe_gating, expert_rows=parameter("mlp.router.layer.weight"),
                         weight_sum=_one),
    "cohere2_moe": _gate(num_experts=config_int("num_experts"), lm_logits=_cohere_logits,
                         weight_sum=lambda c: 1.0 if c.expert_selection_fn == "softmax" or c.norm_topk_prob else None),
    # sigmoid scores, selection with a correction bias, renormalized, scaled
    "deepseek_v3": _deepseek_v3_like(),
    # DeepSeek sparse attention: its indexer picks different keys when a batch is right-padded
    "deepseek_v32": _deepseek_v3_like(pad_free=True),
    "glm_moe_dsa": _deepseek_v3_like(pad_free=True),
    "axk2": _deepseek_v3_like(pad_free=True),
    "axk1": _deepseek_v3_like(),
    "dots1": _deepseek_v3_like(),
    "glm4_moe": _deepseek_v3_like(),
    "glm4_moe_lite": _deepseek_v3_like(),
    "hy_v4": _deepseek_v3_like(),
    "kimi_linear": _deepseek_v3_like(),
    "mimo_v2_flash": _deepseek_v3_like(),
    "solar_open": _deepseek_v3_like(),
    "exaone_moe": _deepseek_v3_like(num_experts=config_int("num_experts")),
    "nemotron_h": _deepseek_v3_like(hook="mixer.gate", expert_rows=parameter("mixer.gate.weight")),
    "deepseek_v4": _deepseek_v3_like(weight_sum=_scale("routed_scaling_factor")),  # hash-routed layers too
    "hy_v3": _gate(weight_sum=_scale("router_scaling_factor")),
    "minimax_m2": _gate(weight_sum=_one),
    "minimax_m3_vl_text": _gate(weight_sum=_one),
    "laguna": _gate(num_experts=config_int("num_experts"), weight_sum=_one),
    "lfm2_moe": _gate("feed_forward.gate", num_experts=config_int("num_experts"),
                      weight_sum=_scale("routed_scaling_factor", if_flag="norm_topk_prob")),
    "afmoe": MoeAdapter("mlp.router", expert_rows=parameter("mlp.router.gate.weight"),
                        num_experts=config_int("num_experts"), weight_sum=_scale("route_scale")),
    "inkling_text": MoeAdapter("mlp.gate", expert_rows=_inkling_rows, num_experts=config_int("n_routed_experts"),
                               lm_logits=_inkling_logits),
    # routed and zero-computation (identity) experts share one softmax: ids cover both
    "longcat_flash": MoeAdapter("mlp.router", expert_rows=parameter("mlp.router.classifier.weight"),
                                num_experts=lambda c: c.n_routed_experts + (c.zero_expert_num or 0)),
    # an MLP router over a state carried across layers; no (E, D) rows: consistency is NaN
    "zaya": MoeAdapter("mlp.gate", read=zaya_router, num_experts=lambda c: c.num_experts + 1),  # E = the skip
    # other rules
    "phimoe": _gate("mlp.router"),
    "gemma4_text": _gate("router", expert_rows=parameter("router.proj.weight"), num_experts=config_int("num_experts"),
                         top_k=config_int("top_k_experts"), lm_logits=_gemma4_logits),
    "llama4_text": _gate("feed_forward.router", read=llama4_router, decoder=lambda model: model.model),
    "jamba": MoeAdapter("feed_forward.experts", read=experts_input, expert_rows=parameter("feed_forward.router.weight"),
                        num_experts=config_int("num_experts")),
    "dbrx": MoeAdapter("ffn.experts", read=experts_input, expert_rows=parameter("ffn.router.layer.weight"),
                       num_experts=lambda c: c.ffn_config.moe_num_experts, top_k=lambda c: c.ffn_config.moe_top_k,
                       weight_sum=lambda c: 1.0 if c.ffn_config.moe_normalize_expert_weights == 1 else None,
                       layers="blocks"),
}

REFUSED: dict[str, str] = {
    "doge": "its MoE block (DogeCDMoE) reshapes its (batch, tokens, 2 x keys) product-key logits as (2, batch x "
            "tokens, keys), so a token's experts depend on the other tokens in the batch, padding included",
    "gemma4": "Gemma4ForConditionalGeneration is a vision-language model; moegrok records text causal LMs: "
              "save its text model (Gemma4ForCausalLM, model_type gemma4_text) and record that",
}


def register_adapter(model_type: str, adapter: MoeAdapter) -> None:
    """Use `adapter` for `model_type` in this process (record actors: use the model.adapter config key)."""
    ADAPTERS[model_type] = adapter


def adapter_for(model: nn.Module) -> MoeAdapter:
    """The built-in (or registered) adapter of the model's family."""
    model_type, name = model.config.model_type, type(model).__name__
    howto = ("write a function that returns a moegrok.adapters.MoeAdapter and set "
             "model.adapter=package.module:function (see the README)")
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    if model_type in REFUSED:
        raise UnsupportedModelError(f"{name} (model_type {model_type!r}) is not supported: {REFUSED[model_type]}. "
                                    f"To record it anyway, {howto}")
    raise UnsupportedModelError(f"{name} (model_type {model_type!r}) is not a supported MoE architecture; "
                                f"supported model types: {', '.join(sorted(ADAPTERS))}. To add one, {howto}")


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
