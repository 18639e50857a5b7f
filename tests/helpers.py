"""Shared helpers of the tests: tiny configs and models built in the test itself, sweep configs."""

from __future__ import annotations

from moegrok.config import PretrainToyConfig, ToyDataConfig, ToyGroupConfig, ToyModelConfig, ToyTrainConfig


def tiny_toy_config(out_dir, **train) -> PretrainToyConfig:
    """A toy zoo small enough to train in seconds: p=11, 2 groups, 2 layers, 4 experts top-2."""
    return PretrainToyConfig(
        out_dir=str(out_dir),
        data=ToyDataConfig(
            p=11, groups=[ToyGroupConfig("add", "add", 0.6), ToyGroupConfig("mul", "mul", 0.5)]
        ),
        model=ToyModelConfig(hidden_size=64, intermediate_size=32, num_layers=2, num_heads=2,
                             num_experts=4, top_k=2),
        train=ToyTrainConfig(**{"max_steps": 6, "save_every": 3, "log_every": 3, **train}),
    )


def tiny_moe_config(family: str, vocab_size: int):
    """A tiny random config of each supported MoE family (3 layers, 8 experts, top-2)."""
    from transformers import DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64, intermediate_size=32,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "olmoe":
        return OlmoeConfig(**common, num_experts=8, num_experts_per_tok=2)
    if family == "mixtral":
        return MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**common, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                              num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                              head_dim=32, norm_topk_prob=True)
    if family == "deepseek_v3":
        return DeepseekV3Config(**common, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                                n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
                                kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=16,
                                qk_nope_head_dim=16, v_head_dim=32, routed_scaling_factor=2.5)
    raise ValueError(family)


MOE_FAMILIES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def save_tiny_moe(family: str, path, *, seed: int = 0):
    """Build a tiny random model of `family` with the toy tokenizer, save it with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    from moegrok.toy.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(11)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(family, len(tokenizer)))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # exercise DeepSeek's biased, unsorted top-k
                buffer.uniform_(-0.5, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def monitor_config(zoo, run_dir, **overrides):
    """A MonitorConfig for the tiny zoo (HF engine unless overridden)."""
    from moegrok.config import (
        BenchmarkConfig,
        CheckpointsConfig,
        EvalConfig,
        ModelConfig,
        MonitorConfig,
        RecordConfig,
        SamplesConfig,
    )

    cfg = MonitorConfig(
        run_dir=str(run_dir),
        progress=False,
        model=ModelConfig(attn_implementation="eager", residue_tokens=11),
        checkpoints=CheckpointsConfig(dir=str(zoo)),
        samples=SamplesConfig(paths=[str(zoo / "samples.jsonl")], max_per_group=20, shard_size=16, max_tokens=32),
        record=RecordConfig(num_actors=1, max_retries=0),
        eval=EvalConfig(benchmarks=[BenchmarkConfig("heldout", str(zoo / "benchmark.jsonl"))], engine="hf",
                        max_new_tokens=2, max_items=40, max_retries=0),
    )
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            setattr(getattr(cfg, section), name, value)
        else:
            setattr(cfg, section, value)
    return cfg
