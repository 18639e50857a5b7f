"""The built-in adapters: one per MoE causal-LM family of transformers 5.19 (keyed by model_type),
and the families moegrok refuses, with the reason.

Each entry follows the family's modeling code: where its router sits, what the router returns,
whether its top-k weights are renormalized (and scaled), where the (E, D) router rows live and
how its ForCausalLM turns hidden states into logits. tests/reference/routing.py writes out each
family's routing rule independently; tests/routing/test_recorder.py checks every entry against it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moegrok.errors import UnsupportedModelError
from moegrok.routing.adapters import (
    IDS_WEIGHTS_LOGITS,
    LOGITS_WEIGHTS_IDS,
    MoeAdapter,
    Reader,
    config_int,
    experts_input,
    lm_head_logits,
    parameter,
)


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


def _one(config) -> float:
    return 1.0


def _one_if(flag: str) -> Callable[[Any], float | None]:
    return lambda config: 1.0 if getattr(config, flag) else None


def _scale(name: str, *, if_flag: str | None = None) -> Callable[[Any], float | None]:
    """Weights normalized to sum to 1, then multiplied by config.<name> (if config.<if_flag>)."""
    return lambda config: float(getattr(config, name)) if if_flag is None or getattr(config, if_flag) else None


def _granite_logits(model, hidden_ND):
    return lm_head_logits(model, hidden_ND) / model.config.logits_scaling


def _cohere_logits(model, hidden_ND):
    return lm_head_logits(model, hidden_ND) * model.logit_scale


def _gemma4_logits(model, hidden_ND):
    logits_NV, cap = lm_head_logits(model, hidden_ND), model.config.final_logit_softcapping
    return logits_NV if cap is None else torch.tanh(logits_NV / cap) * cap


def _inkling_logits(model, hidden_ND):
    logits_NV = lm_head_logits(model, hidden_ND / model.config.logits_mup_width_multiplier)
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
    "gemma4": "it is a vision-language model and moegrok records text causal LMs: save its text model "
              "(Gemma4ForCausalLM, model_type gemma4_text) and record that",
}


def register_adapter(model_type: str, adapter: MoeAdapter) -> None:
    """Use `adapter` for `model_type` in this process (record actors: the model.adapter config key)."""
    ADAPTERS[model_type] = adapter


def adapter_for(model: nn.Module) -> MoeAdapter:
    """The built-in (or registered) adapter of the model's family."""
    model_type, name = model.config.model_type, type(model).__name__
    howto = ("write a function that returns a moegrok.routing.adapters.MoeAdapter and set "
             "model.adapter=package.module:function (docs/moe-families.md)")
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    if model_type in REFUSED:
        raise UnsupportedModelError(f"{name} (model_type {model_type!r}) is not supported: {REFUSED[model_type]}. "
                                    f"To record it anyway, {howto}")
    raise UnsupportedModelError(f"{name} (model_type {model_type!r}) is not a supported MoE architecture; "
                                f"supported model types: {', '.join(sorted(ADAPTERS))}. To add one, {howto}")
