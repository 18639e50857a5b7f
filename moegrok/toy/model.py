"""The toy zoo's model: an ordinary `OlmoeForCausalLM` built from a small `OlmoeConfig`."""

from __future__ import annotations

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

from moegrok.config import ToyModelConfig

MAX_POSITIONS = 32  # the longest toy prompt + answer: 9 tokens (plain), 22 (chain of muladd)


def build_model(
    cfg: ToyModelConfig, tokenizer: PreTrainedTokenizerFast, *, seed: int
) -> OlmoeForCausalLM:
    config = OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=MAX_POSITIONS,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        initializer_range=cfg.initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return OlmoeForCausalLM(config)
