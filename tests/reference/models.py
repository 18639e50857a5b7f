"""Tiny random models of every MoE family transformers has, built from configs here and saved with
`save_pretrained` (the toy tokenizer's vocabulary)."""

from __future__ import annotations

# Tiny random MoE models, one per family: 3 layers (the dense ones where a family starts with a dense
# layer), hidden 64, 8 experts, top-2 (Llama 4: top-1). Keys absent from a family's config are ignored.
TINY_COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                   max_position_embeddings=64, intermediate_size=32, moe_intermediate_size=32,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_DEEPSEEK = dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                 first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=16,
                 v_head_dim=32, head_dim=16, routed_scaling_factor=2.5)
_SPARSE_AFTER_DENSE = ["dense", "sparse", "sparse"]
_SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
_LINEAR = dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2,
               head_dim=32, shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
TINY_MOE = {
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "flex_olmo": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "mellum": dict(num_experts=8, num_experts_per_tok=2),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "minimax": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=32, block_size=16,
                    layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "qwen2_moe": dict(shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, head_dim=32, norm_topk_prob=True),
    "qwen3_next": dict(_LINEAR, layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "qwen3_5_moe_text": dict(_LINEAR, layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "qwen4_exp_text": dict(_LINEAR, layer_types=["linear_attention", "indexed_attention", "linear_attention"],
                           indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=32, indexer_budget=8,
                           indexer_compress_ratio=2, hc_lowrank=8, ple_embed_dim=16, ngram_vocab_size_base=64,
                           split_ngram_parts=4),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, head_dim=32),
    "ernie4_5_moe": dict(moe_k=2, moe_num_experts=8, moe_num_shared_experts=1, moe_layer_start_index=1,
                         moe_layer_end_index=2),
    "deepseek_v2": dict(_DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=1.5),
    "deepseek_v3": dict(_DEEPSEEK),
    "deepseek_v32": dict(_DEEPSEEK, mlp_layer_types=_SPARSE_AFTER_DENSE, index_topk=8, index_head_dim=16,
                         index_n_heads=2),
    "deepseek_v4": dict(_DEEPSEEK, head_dim=32, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16,
                        index_topk=8, hc_mult=2, sliding_window=8, mlp_layer_types=["hash_moe", "moe", "moe"],
                        layer_types=["compressed_sparse_attention", "heavily_compressed_attention",
                                     "compressed_sparse_attention"]),
    "axk1": dict(_DEEPSEEK),
    "axk2": dict(_DEEPSEEK, mlp_layer_types=_SPARSE_AFTER_DENSE, layer_types=["full_attention"] * 3, index_topk=8,
                 index_head_dim=16, index_n_heads=2),
    "dots1": dict(_DEEPSEEK, norm_topk_prob=False, layer_types=["full_attention"] * 3),
    "glm4_moe": dict(_DEEPSEEK),
    "glm4_moe_lite": dict(_DEEPSEEK),
    "glm_moe_dsa": dict(_DEEPSEEK, mlp_layer_types=_SPARSE_AFTER_DENSE, index_topk=8, index_head_dim=16,
                        index_n_heads=2),
    "hy_v4": dict(_DEEPSEEK),
    "kimi_linear": dict(_DEEPSEEK, num_experts=8, num_experts_per_token=2, mlp_layer_types=_SPARSE_AFTER_DENSE,
                        layer_types=["linear_attention", "full_attention", "linear_attention"], linear_head_dim=16,
                        linear_num_heads=2, num_expert_group=1),
    "mimo_v2_flash": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, head_dim=16,
                          v_head_dim=16, num_attention_heads=4, num_key_value_heads=1,  # sliding layers: 2 kv heads
                          layer_types=["full_attention", "sliding_attention", "full_attention"],
                          mlp_layer_types=_SPARSE_AFTER_DENSE),
    "solar_open": dict(_DEEPSEEK),
    "exaone_moe": dict(num_experts=8, num_experts_per_tok=2, num_shared_experts=1, n_group=2, topk_group=1,
                       head_dim=32, layer_types=_SLIDING, mlp_layer_types=_SPARSE_AFTER_DENSE,
                       first_k_dense_replace=1),
    "nemotron_h": dict(n_routed_experts=8, num_experts_per_tok=2, moe_shared_expert_intermediate_size=32,
                       layers_block_type=["moe", "full_attention", "moe"], head_dim=32, mamba_num_heads=4,
                       mamba_head_dim=16, n_groups=1, routed_scaling_factor=1.5),
    "hy_v3": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=32, router_scaling_factor=2.0),
    "minimax_m2": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=32),
    "minimax_m3_vl_text": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=32, shared_intermediate_size=32,
                               dense_intermediate_size=32, mlp_layer_types=_SPARSE_AFTER_DENSE,
                               layer_types=["full_attention"] * 3),
    "laguna": dict(num_experts=8, num_experts_per_tok=2, head_dim=32, moe_router_logit_softcapping=2.0),
    "lfm2_moe": dict(num_experts=8, num_experts_per_tok=2, num_dense_layers=1, routed_scaling_factor=1.5,
                     layer_types=["conv", "full_attention", "conv"]),
    "afmoe": dict(num_experts=8, num_experts_per_tok=2, num_dense_layers=1, num_shared_experts=1, head_dim=32,
                  route_scale=2.0, layer_types=_SLIDING),
    "inkling_text": dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, head_dim=32),
    "longcat_flash": dict(_DEEPSEEK, n_routed_experts=6, zero_expert_num=2, expert_ffn_hidden_size=32,
                          ffn_hidden_size=32, num_layers=2),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2, logits_scaling=2.0),
    "granitemoeshared": dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=32,
                             logits_scaling=2.0),
    "granitemoehybrid": dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=32,
                             logits_scaling=2.0, layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4,
                             mamba_d_head=32, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16),
    "granitemoe_swa": dict(num_local_experts=8, num_experts_per_tok=2, logits_scaling=2.0),
    "aria_text": dict(moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1, head_dim=32),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=32, layer_types=_SLIDING),
    "jetmoe": dict(num_local_experts=8, num_experts_per_tok=2, kv_channels=32),
    "cohere2_moe": dict(num_experts=8, num_experts_per_tok=2, head_dim=32, layer_types=_SLIDING,
                        mlp_layer_types=["sparse"] * 3, num_shared_experts=1, shared_expert_intermediate_size=32),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "gemma4_text": dict(num_experts=8, top_k_experts=2, enable_moe_block=True, head_dim=32, layer_types=_SLIDING,
                        vocab_size_per_layer_input=32, hidden_size_per_layer_input=0, per_layer_config={},
                        final_logit_softcapping=30.0),
    "llama4_text": dict(num_local_experts=8, num_experts_per_tok=1, intermediate_size_mlp=32, head_dim=32,
                        interleave_moe_layer_step=1),
    "jamba": dict(num_experts=8, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                  expert_layer_period=1, expert_layer_offset=0, mamba_d_state=8, mamba_expand=2),
    "zaya": dict(num_experts=8, num_experts_per_tok=1, router_hidden_size=16, head_dim=32,
                 layer_types=["hybrid"] * 3),
    "dbrx": dict(d_model=64, n_heads=2, n_layers=3, max_seq_len=64,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2)),
}
MOE_FAMILIES = tuple(TINY_MOE)
# families moegrok refuses (moegrok.routing.adapters.REFUSED)
TINY_REFUSED = {
    "doge": dict(is_moe=True, num_experts=16, num_experts_per_tok=2),
}


# vision-language configs that AutoModelForCausalLM loads as their text model
LOADED_AS_TEXT = {"llama4": "llama4_text", "qwen3_5_moe": "qwen3_5_moe_text", "qwen4_exp": "qwen4_exp_text"}


def moe_causal_lm_types() -> list[str]:
    """The causal-LM model types of the installed transformers whose modeling code reports router logits."""
    import re
    from pathlib import Path

    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    models = Path(transformers.__file__).parent / "models"
    found = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        module = model_type_to_module_name(model_type)
        source = models / module / f"modeling_{module}.py"
        if source.exists() and re.search(r'"router_logits":\s*(OutputRecorder|\[)', source.read_text()):
            found.append(model_type)
    return found


def tiny_moe_config(family: str, vocab_size: int):
    """A tiny random config of an MoE family (a model_type of transformers)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    family_kwargs = TINY_MOE[family] if family in TINY_MOE else TINY_REFUSED[family]
    return CONFIG_MAPPING[family](**{**TINY_COMMON, "vocab_size": vocab_size, **family_kwargs})


def _randomize_routing_buffers(model, generator) -> None:
    """Give router weights, biases, scales and hash tables that start as zeros or ones values that
    change the routing."""
    import torch

    for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
        if name.endswith(("e_score_correction_bias", "expert_bias", "router.bias")):
            tensor.copy_((torch.rand(tensor.shape, generator=generator) - 0.5) / 10)  # about the scores' spread
        elif name.endswith("per_expert_scale"):  # Gemma 4
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        elif name.endswith(("gate.weight", "router.gate.weight")) and tensor.ndim == 2 and not tensor.any():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)  # Ernie 4.5, AFMoE: zero routers
        elif name.endswith("router_mlp.out_proj.weight"):  # ZAYA: logits far apart enough to stay ordered
            tensor.mul_(300)
        elif name.endswith("tid2eid"):  # DeepSeek-V4 hash routing: distinct experts per token
            tensor.copy_(torch.stack([torch.randperm(8, generator=generator)[: tensor.shape[1]]
                                      for _ in range(tensor.shape[0])]))


def save_tiny_moe(family: str, path, *, seed: int = 0):
    """Build a tiny random model of `family` with the toy tokenizer, save it with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    from moegrok.toy.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(11)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(family, len(tokenizer)))
    with torch.no_grad():
        _randomize_routing_buffers(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_remote_moe(path, *, seed: int = 0):
    """A tiny model of the family in tests/reference/remote_moe.py, saved with its code (trust_remote_code)."""
    import torch

    from moegrok.toy.tokenizer import build_tokenizer
    from tests.reference.remote_moe import RemoteMoeConfig, RemoteMoeForCausalLM

    tokenizer = build_tokenizer(11)
    torch.manual_seed(seed)
    config = RemoteMoeConfig(**{**TINY_COMMON, "vocab_size": len(tokenizer), **TINY_MOE["mixtral"]})
    RemoteMoeConfig.register_for_auto_class()
    RemoteMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    RemoteMoeForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
