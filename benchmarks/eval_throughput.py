"""Benchmark items/s of the vLLM engine vs the HF engine on the same checkpoint and items.

    python benchmarks/eval_throughput.py [--zoo zoo/default] [--items 2000]

Both engines score the toy zoo's held-out items (greedy exact match) and the same items as
two-way multiple choice (log-likelihood); the engine start is timed separately.
"""

import argparse
import time
from pathlib import Path

from moegrok.evaluation.engines import HFEngine, VLLMEngine
from moegrok.evaluation.items import Item, load_benchmark
from moegrok.evaluation.scoring import score_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo/default"))
    parser.add_argument("--items", type=int, default=2000)
    args = parser.parse_args()
    checkpoint = max(args.zoo.glob("step*"), key=lambda p: int(p.name[4:]))
    exact = load_benchmark(args.zoo / "benchmark.jsonl")[: args.items]
    choice = [Item(i.id, i.group, "choice", i.prompt, choices=[f" {i.answer}", f" {(int(i.answer) + 1) % 47}"],
                   label=0) for i in exact]
    results = {}
    for name, engine in (("vllm", VLLMEngine(gpu_memory_utilization=0.3)), ("hf", HFEngine(batch_size=256))):
        start = time.perf_counter()
        engine.load(str(checkpoint))
        load_s = time.perf_counter() - start
        rates = {}
        for kind, items in (("exact", exact), ("choice", choice)):
            score_items(engine, items[:16], max_new_tokens=1, code_timeout_s=5)  # warm-up
            start = time.perf_counter()
            scored = score_items(engine, items, max_new_tokens=1, code_timeout_s=5)  # as conf/eval/toy.yaml
            rates[kind] = (len(items) / (time.perf_counter() - start), scored["score"].mean())
        engine.close()
        results[name] = rates
        print(f"{name:5s} start {load_s:5.1f} s | exact {rates['exact'][0]:8.0f} items/s (acc {rates['exact'][1]:.3f})"
              f" | choice {rates['choice'][0]:8.0f} items/s (acc {rates['choice'][1]:.3f})")
    for kind in ("exact", "choice"):
        print(f"{kind}: vLLM / HF items/s = {results['vllm'][kind][0] / results['hf'][kind][0]:.2f}x")


if __name__ == "__main__":
    main()
