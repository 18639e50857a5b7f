"""Slow, plainly written reference routing of every supported MoE family.

For one sample and each MoE layer: the top-k expert ids and the weights the family's modeling
code mixes them with, written out from the layer's router logits (`output_router_logits`), the
config and the layer's routing buffers (correction biases, scales, hash tables), highest weight
first. Where the logits alone do not determine the routing (Inkling's shared-expert logits,
DeepSeek-V4's hash-routed layers, which report no logits) the router's input is captured and
the logits are computed from it. Used by tests/routing/test_recorder.py and benchmarks/moe_families.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_topk(logits, k, *, normalize):
    weights, ids = F.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return ids, weights / weights.sum(-1, keepdim=True) if normalize else weights


def topk_softmax(logits, k):
    values, ids = logits.float().topk(k, dim=-1)
    return ids, F.softmax(values, dim=-1)


def select_with_bias(scores, bias, k):
    """Experts chosen by scores + bias; weights are the unbiased scores."""
    ids = (scores + bias).topk(k, dim=-1).indices
    return ids, scores.gather(-1, ids)


def normalized(weights, eps=1e-20):
    return weights / (weights.sum(-1, keepdim=True) + eps)


def group_limited(choice, *, num_groups, keep_groups, fill, score_group):
    """Mask every expert outside the `keep_groups` best of `num_groups` equal groups."""
    grouped = choice.view(len(choice), num_groups, -1)
    best = score_group(grouped).topk(keep_groups, dim=-1).indices
    keep = torch.zeros(len(choice), num_groups, dtype=torch.bool).scatter_(1, best, True)
    return choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), fill)


def top2_sum(grouped):
    return grouped.topk(2, dim=-1).values.sum(-1)


def deepseek_v3(logits, bias, config, *, fill=float("-inf")):
    """Sigmoid scores; group-limited choice on scores + correction bias; renormalize; scale."""
    scores = logits.float().sigmoid()
    choice = scores + bias
    if config.n_group is not None:
        choice = group_limited(choice, num_groups=config.n_group, keep_groups=config.topk_group, fill=fill,
                               score_group=top2_sum)
    ids = choice.topk(config.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(-1, ids)
    if config.norm_topk_prob:
        weights = normalized(weights)
    return ids, weights * config.routed_scaling_factor


def deepseek_v2(logits, _, config):
    """Softmax; greedy or group-limited-greedy (best expert per group) top-k; scale, no renormalization."""
    scores = F.softmax(logits.float(), dim=-1)
    if config.topk_method == "group_limited_greedy":
        scores = group_limited(scores, num_groups=config.n_group, keep_groups=config.topk_group, fill=0.0,
                               score_group=lambda grouped: grouped.amax(-1))
    weights, ids = scores.topk(config.num_experts_per_tok, dim=-1)
    return ids, weights * config.routed_scaling_factor


def sparsemixer(logits, config):
    """PhiMoE's top-2 in eval mode: each pick's weight is a softmax over the experts within
    2 * router_jitter_noise (relative) of it."""
    scores = logits.float()
    eps = config.router_jitter_noise

    def pick(masked_scores):
        best, best_id = masked_scores.max(dim=-1, keepdim=True)
        far = (best - scores) / scores.abs().clamp(min=best) > 2 * eps
        return best_id, F.softmax(masked_scores.masked_fill(far, float("-inf")), dim=-1).gather(-1, best_id)

    first_id, first_weight = pick(scores)
    second_id, second_weight = pick(scores.scatter(-1, first_id, float("-inf")))
    return torch.cat([first_id, second_id], -1), torch.cat([first_weight, second_weight], -1)


def deepseek_v4(logits, gate, config, input_ids):
    """sqrt(softplus) scores; hash layers take experts from a token-id table, the others choose on
    scores + correction bias; renormalize; scale."""
    scores = F.softplus(logits.float()).sqrt()
    if hasattr(gate, "tid2eid"):
        ids = gate.tid2eid[input_ids]
        weights = scores.gather(-1, ids)
    else:
        ids, weights = select_with_bias(scores, gate.e_score_correction_bias, config.num_experts_per_tok)
    return ids, normalized(weights) * config.routed_scaling_factor


def inkling(logits_all, gate, config):
    """Sigmoid choice on the routed experts + bias; weights: softmax of the log-sigmoid of the chosen
    and the shared experts' logits, times route_scale and the learned global scale; routed part only."""
    num_routed, k = config.n_routed_experts, config.num_experts_per_tok
    routed, shared = logits_all[:, :num_routed].float(), logits_all[:, num_routed:].float()
    ids = (routed.sigmoid() + gate.e_score_correction_bias).topk(k, dim=-1).indices
    log_probs = F.logsigmoid(torch.cat([routed.gather(-1, ids), shared], -1))
    weights = F.softmax(log_probs, dim=-1) * config.route_scale * gate.global_scale
    return ids, weights[:, :k]


def _dbrx(logits, _, config):
    ffn = config.ffn_config
    weights, ids = F.softmax(logits.float(), dim=-1).topk(ffn.moe_top_k, dim=-1)
    p = ffn.moe_normalize_expert_weights
    return ids, weights if p is None else weights / weights.norm(p=p, dim=-1, keepdim=True)


def _cohere2(logits, _, config):
    values, ids = logits.float().topk(config.num_experts_per_tok, dim=-1)
    if config.expert_selection_fn == "softmax":
        return ids, F.softmax(values, dim=-1)
    weights = values.sigmoid()
    return ids, weights / weights.sum(-1, keepdim=True) if config.norm_topk_prob else weights


def _lfm2(logits, expert_bias, config):
    scores = logits.float().sigmoid()
    if config.use_expert_bias:
        ids, weights = select_with_bias(scores, expert_bias, config.num_experts_per_tok)
    else:
        weights, ids = scores.topk(config.num_experts_per_tok, dim=-1)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-6)
    return ids, weights * config.routed_scaling_factor


def _gemma4(probs, per_expert_scale, config):  # Gemma 4 reports router probabilities, not logits
    weights, ids = probs.float().topk(config.top_k_experts, dim=-1)
    return ids, weights / weights.sum(-1, keepdim=True) * per_expert_scale[ids]


def _llama4(logits, _, config):
    values, ids = logits.float().topk(config.num_experts_per_tok, dim=-1)
    return ids, values.sigmoid()


def _ernie(logits, bias_1E, config):
    """Softmax; choice on probabilities + bias; renormalize (denominator at least moe_norm_min)."""
    ids, weights = select_with_bias(F.softmax(logits.float(), dim=-1), bias_1E[0], config.moe_k)
    return ids, weights / weights.sum(-1, keepdim=True).clamp(min=config.moe_norm_min)


def _longcat(logits, bias, config):
    """Softmax over routed and zero experts; choice on probabilities + bias; scale, no renormalization."""
    ids, weights = select_with_bias(F.softmax(logits.float(), dim=-1), bias, config.num_experts_per_tok)
    return ids, weights * config.routed_scaling_factor


def sigmoid_biased(scale: str | None):
    """Sigmoid; choice on scores + correction bias; renormalize; times config.<scale>."""

    def rule(logits, bias, config):
        ids, weights = select_with_bias(logits.float().sigmoid(), bias, config.num_experts_per_tok)
        return ids, normalized(weights) * (getattr(config, scale) if scale else 1.0)

    return rule


def _zaya(logits, balancing_biases, config):
    """Softmax over the experts and a skip expert (id E); choice on probabilities + balancing biases;
    the skip expert does no computation: weight 0."""
    probs = F.softmax(logits.float(), dim=-1)
    ids = (probs + balancing_biases).topk(config.num_experts_per_tok, dim=-1).indices
    return ids, probs.gather(-1, ids).masked_fill(ids == config.num_experts, 0.0)


def _softmax_topk_rule(*, normalize, k="num_experts_per_tok"):
    def rule(logits, _, config):
        return softmax_topk(logits, getattr(config, k), normalize=normalize(config))

    return rule


def _topk_softmax_rule(k="num_experts_per_tok"):
    return lambda logits, _, config: topk_softmax(logits, getattr(config, k))


def _norm_topk_prob(config):
    return config.norm_topk_prob


def _always(config):
    return True


def _never(config):
    return False


# family -> (path of the routing tensor inside a decoder layer handed to the rule, "" = none;
#            rule(logits_NE, tensor, config) -> (ids_NK, weights_NK))
_BIAS = "mlp.gate.e_score_correction_bias"
RULES = {
    **{family: ("", _softmax_topk_rule(normalize=_norm_topk_prob))
       for family in ("olmoe", "flex_olmo", "mellum", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen4_exp_text")},
    **{family: ("", _softmax_topk_rule(normalize=_always))
       for family in ("qwen3_5_moe_text", "mixtral", "minimax", "remote_moe")},  # remote_moe.py here
    "hunyuan_v1_moe": ("", _softmax_topk_rule(normalize=_always, k="moe_topk")),
    "jamba": ("", _softmax_topk_rule(normalize=_never)),
    "dbrx": ("", _dbrx),
    **{family: ("", _topk_softmax_rule())
       for family in ("granitemoe", "granitemoeshared", "granitemoehybrid", "granitemoe_swa", "jetmoe", "gpt_oss")},
    "aria_text": ("", _topk_softmax_rule(k="moe_topk")),
    "cohere2_moe": ("", _cohere2),
    **{family: (_BIAS, deepseek_v3) for family in (
        "deepseek_v3", "deepseek_v32", "axk1", "dots1", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "hy_v4",
        "kimi_linear", "mimo_v2_flash", "solar_open", "exaone_moe")},
    "axk2": (_BIAS, lambda logits, bias, config: deepseek_v3(logits, bias, config, fill=0.0)),
    "nemotron_h": ("mixer.gate.e_score_correction_bias", deepseek_v3),
    "deepseek_v2": ("", deepseek_v2),
    "ernie4_5_moe": ("mlp.gate.moe_statics.e_score_correction_bias", _ernie),
    "longcat_flash": ("mlp.router.e_score_correction_bias", _longcat),
    "afmoe": ("mlp.expert_bias", sigmoid_biased("route_scale")),
    "hy_v3": ("mlp.e_score_correction_bias", sigmoid_biased("router_scaling_factor")),
    "minimax_m2": ("mlp.e_score_correction_bias", sigmoid_biased(None)),
    "minimax_m3_vl_text": (_BIAS, sigmoid_biased(None)),
    "laguna": (_BIAS, sigmoid_biased(None)),  # its router logits come soft-capped
    "lfm2_moe": ("feed_forward.expert_bias", _lfm2),
    "phimoe": ("", lambda logits, _, config: sparsemixer(logits, config)),
    "gemma4_text": ("router.per_expert_scale", _gemma4),
    "llama4_text": ("", _llama4),
    "zaya": ("mlp.gate.balancing_biases", _zaya),
}
REFERENCE_FAMILIES = (*RULES, "inkling_text", "deepseek_v4")


def decoder_layers(model):
    inner = model.transformer if hasattr(model, "transformer") else model.model
    return inner.blocks if hasattr(inner, "blocks") else inner.layers


def _tensor_at(layer, path):
    """The tensor at a dotted path inside a layer, or None where the layer lacks it (a dense layer)."""
    module_path, _, name = path.rpartition(".")
    try:
        return getattr(layer.get_submodule(module_path), name)
    except AttributeError:
        return None


@torch.no_grad()
def reference_routing(family: str, model, input_ids_T: torch.Tensor):
    """For one sample: [(ids_NK, weights_NK)] per MoE layer (highest weight first) and the model's logits (T, V)."""
    config = model.config
    gates = [layer.mlp.gate for layer in decoder_layers(model) if _tensor_at(layer, "mlp.gate.weight") is not None]
    gate_inputs = []  # DeepSeek-V4 and Inkling: the routers' inputs, for logits the output leaves out
    handles = [gate.register_forward_pre_hook(lambda _, args: gate_inputs.append(args[0].flatten(0, -2)))
               for gate in gates] if family in ("inkling_text", "deepseek_v4") else []
    try:
        out = model(input_ids_T[None], output_router_logits=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    logits = list(out.router_logits)
    if family == "jetmoe":  # per layer: two entries of the attention's router, then the MLP router's
        logits = logits[2::3]
    if family == "inkling_text":  # router_logits leave out the shared experts' logits
        routing = [inkling(torch.cat([routed, F.linear(x, gate.weight[config.n_routed_experts:])], -1), gate, config)
                   for routed, x, gate in zip(logits, gate_inputs, gates, strict=True)]
    elif family == "deepseek_v4":  # hash-routed layers report no logits
        routing = [deepseek_v4(F.linear(x, gate.weight) if hasattr(gate, "tid2eid") else logits.pop(0), gate, config,
                               input_ids_T) for x, gate in zip(gate_inputs, gates, strict=True)]
    else:
        path, rule = RULES[family]
        tensors = [t for t in (_tensor_at(layer, path) for layer in decoder_layers(model)) if t is not None] if path \
            else [None] * len(logits)
        routing = [rule(layer_logits, tensor, config) for layer_logits, tensor in zip(logits, tensors, strict=True)]
    ordered = []
    for ids, weights in routing:
        weights, order = weights.float().sort(dim=-1, descending=True, stable=True)
        ordered.append((ids.gather(-1, order), weights))
    return ordered, out.logits[0]
