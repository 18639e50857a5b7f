"""Routing storage at OLMoE-1B-7B's routing shape (16 layers, 64 experts, top-8): bytes per token
of the token-level and the compact tables, and what each costs to record and to reduce, measured
in the same run (interleaved rounds, medians). A random model with a small hidden size stands in
for the real one: the routing tables' size depends on the routing shape, not on the model.

    python benchmarks/storage.py [--samples 64] [--tokens 300] [--rounds 3]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from moegrok.data.samples import TokenizedSample
from moegrok.metrics.compact import compact_table
from moegrok.metrics.table import checkpoint_features
from moegrok.routing.recorder import RoutingRecorder, router_weights

POSITIONS = ["all", "answer"]
PAPER = {"revisions": 500, "groups": 4, "samples_per_group": 10_000}


def olmoe_shaped_model() -> OlmoeForCausalLM:
    config = OlmoeConfig(vocab_size=50304, hidden_size=64, intermediate_size=32, num_hidden_layers=16,
                         num_attention_heads=2, num_key_value_heads=2, num_experts=64, num_experts_per_tok=8,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    return OlmoeForCausalLM(config).eval()


def samples(num: int, tokens: int) -> list[TokenizedSample]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(tokens // 2, tokens * 3 // 2, size=num)
    return [TokenizedSample(f"s{i}", f"g{i % 4}", rng.integers(1, 50304, n).astype(np.int64), int(n) * 3 // 4)
            for i, n in enumerate(lengths)]


def file_bytes(table, path: Path) -> int:
    pq.write_table(table, path)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=300, help="mean tokens per sample")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model, batch = olmoe_shaped_model(), samples(args.samples, args.tokens)
    num_tokens = sum(len(s.input_ids) for s in batch)
    routers = router_weights(model).numpy()
    recorder = RoutingRecorder(model, keep_input_ids=True)
    subset = {s.sample_id for s in batch[: max(1, args.samples // 32)]}  # ~3% keep their tokens
    seconds = {"record": [], "record + compact": [], "reduce tokens": [], "reduce compact": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            start = time.perf_counter()
            tokens = recorder.record(batch, checkpoint="c", step=0)
            seconds["record"].append(time.perf_counter() - start)
            start = time.perf_counter()
            compact = compact_table(recorder.record(batch, checkpoint="c", step=0), positions=POSITIONS,
                                    keep_tokens=subset)
            seconds["record + compact"].append(time.perf_counter() - start)
            for name, table in (("reduce tokens", tokens), ("reduce compact", compact)):
                start = time.perf_counter()
                checkpoint_features(table, routers, weight_share=0.7, positions=POSITIONS)
                seconds[name].append(time.perf_counter() - start)
        sizes = {"tokens (with input_ids)": file_bytes(tokens, Path(tmp) / "t.parquet"),
                 "tokens (no input_ids)": file_bytes(tokens.drop_columns(["input_ids"]), Path(tmp) / "n.parquet"),
                 f"compact ({len(subset)} of {args.samples} samples keep tokens)":
                     file_bytes(compact, Path(tmp) / "c.parquet"),
                 "compact (no token subset)": file_bytes(compact_table(tokens, positions=POSITIONS, keep_tokens=()),
                                                         Path(tmp) / "z.parquet")}
    print(f"{args.samples} samples, {num_tokens} tokens ({num_tokens / args.samples:.0f} per sample), "
          "16 layers, top-8 of 64 experts, positions all + answer")
    per_checkpoint = PAPER["groups"] * PAPER["samples_per_group"] * args.tokens
    for name, size in sizes.items():
        total = size / num_tokens * per_checkpoint * PAPER["revisions"]
        print(f"  {name:45s} {size / num_tokens:8.1f} bytes/token -> {total / 1e12:6.2f} TB for "
              f"{PAPER['revisions']} revisions x {PAPER['groups']} x {PAPER['samples_per_group']:,} samples "
              f"x {args.tokens} tokens")
    median = {name: statistics.median(values) for name, values in seconds.items()}
    ratio = median["record"] / median["record + compact"]
    print(f"  record: {num_tokens / median['record']:,.0f} tok/s; with the compact conversion "
          f"{num_tokens / median['record + compact']:,.0f} tok/s ({ratio:.2f}x)")
    print(f"  reduce features: token table {args.samples / median['reduce tokens']:,.0f} samples/s, compact "
          f"{args.samples / median['reduce compact']:,.0f} samples/s "
          f"({median['reduce tokens'] / median['reduce compact']:.2f}x)")


if __name__ == "__main__":
    main()
