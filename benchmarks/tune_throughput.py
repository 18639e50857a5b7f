"""Tokens/s of the LoRA tuning step (tune-then-evaluate) on the toy model.

    python benchmarks/tune_throughput.py [--zoo zoo/default] [--examples 2000]
    python benchmarks/tune_throughput.py --gpu    # OLMoE-1B-7B-shaped random bf16 model on CUDA

Reports tuning tokens/s with LoRA (q/k/v, rank 32) against a full-parameter AdamW step on the
same batches, measured in the same run.
"""

import argparse
import time
from pathlib import Path

import torch

from moegrok.config import TuneConfig
from moegrok.evaluation.tuning import _batches, _loss, lora_model, read_instructions


def tokens_per_second(model, pairs, tokenizer, cfg: TuneConfig, *, device: str, steps: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    batches = list(_batches(pairs, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                            generator=torch.Generator().manual_seed(0)))[: steps + 2]
    model.train()
    tokens, elapsed = 0, 0.0
    for index, (input_ids, labels, mask) in enumerate(batches):
        start = time.perf_counter()
        loss = _loss(model, input_ids.to(device), labels.to(device), mask.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if index >= 2:  # warm-up
            elapsed += time.perf_counter() - start
            tokens += int(mask.sum())
    return tokens / elapsed


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo/default"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    cfg = TuneConfig(method="lora", batch_size=64, max_length=32)
    device = "cuda" if args.gpu else "cpu"
    if args.gpu:
        from transformers import OlmoeConfig, OlmoeForCausalLM

        config = OlmoeConfig(hidden_size=2048, num_hidden_layers=16, num_experts=64, num_experts_per_tok=8,
                             intermediate_size=1024, vocab_size=50304, num_attention_heads=16)
        tokenizer = AutoTokenizer.from_pretrained(args.zoo / "step0")

        def build():
            with torch.device("cuda"):
                return OlmoeForCausalLM(config).to(torch.bfloat16)
        cfg = TuneConfig(method="lora", batch_size=8, max_length=512)
    else:
        checkpoint = max(args.zoo.glob("step*"), key=lambda p: int(p.name[4:]))
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)

        def build():
            return AutoModelForCausalLM.from_pretrained(checkpoint)
    pairs = read_instructions(args.zoo / "samples.jsonl")  # the zoo's training split as instructions
    lora = tokens_per_second(lora_model(build(), cfg), pairs, tokenizer, cfg, device=device, steps=args.steps)
    full = tokens_per_second(build(), pairs, tokenizer, cfg, device=device, steps=args.steps)
    print(f"LoRA (q/k/v, rank {cfg.rank}): {lora:,.0f} tok/s; full fine-tuning: {full:,.0f} tok/s; "
          f"ratio {lora / full:.2f}x")


if __name__ == "__main__":
    main()
