"""Time per 1M routed tokens of the OLMoE paper's routing analyses (16 layers, top-8 of 64),
as the reduce stage computes them (additive statistics, then finalized), against a plain Python
loop per token on a subset, measured in the same run.

    python benchmarks/routing_analyses.py [--tokens 1000000] [--loop-tokens 5000]
"""

import argparse
import time

import numpy as np

from moegrok.routing.analyses import coactivation, domain_specialization, finalize_statistics, token_statistics

NUM_LAYERS, NUM_EXPERTS, TOP_K = 16, 64, 8


def routes(num_tokens: int, seed: int, chunk: int = 50_000) -> np.ndarray:
    """Random top-k routes (k distinct experts per token), built in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    parts = [np.argpartition(rng.random((NUM_LAYERS, min(chunk, num_tokens - start), NUM_EXPERTS),
                                        dtype=np.float32), TOP_K, axis=-1)[..., :TOP_K].astype(np.int16)
             for start in range(0, num_tokens, chunk)]
    return np.concatenate(parts, axis=1)


def vectorized(ids, reference, input_ids) -> None:
    stats = token_statistics(ids, num_experts=NUM_EXPERTS, reference_LNK=reference, input_ids_N=input_ids,
                             with_coactivation=True)
    finalize_statistics(stats, num_experts=NUM_EXPERTS, top_k=TOP_K)
    coactivation(stats)
    domain_specialization(stats, top_k=TOP_K)


def python_loop(ids, reference, input_ids) -> None:
    for layer in range(ids.shape[0]):
        shared, agree = 0.0, 0
        pair_counts: dict = {}
        expert_counts = [0] * NUM_EXPERTS
        vocab: dict = {}
        for t in range(ids.shape[1]):
            token, ref = ids[layer, t].tolist(), reference[layer, t].tolist()
            shared += len(set(token) & set(ref)) / TOP_K
            agree += token[0] == ref[0]
            for a in token:
                expert_counts[a] += 1
                for b in token:
                    if a != b:
                        pair_counts[a, b] = pair_counts.get((a, b), 0) + 1
            key = (int(input_ids[t]), token[0])
            vocab[key] = vocab.get(key, 0) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--loop-tokens", type=int, default=5_000)
    args = parser.parse_args()
    ids, reference = routes(args.tokens, 0), routes(args.tokens, 1)
    input_ids = np.random.default_rng(2).integers(0, 50_000, args.tokens)
    start = time.perf_counter()
    vectorized(ids, reference, input_ids)
    fast = (time.perf_counter() - start) / args.tokens * 1e6
    n = args.loop_tokens
    start = time.perf_counter()
    vectorized(ids[:, :n], reference[:, :n], input_ids[:n])
    fast_small = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    python_loop(ids[:, :n], reference[:, :n], input_ids[:n])
    slow = (time.perf_counter() - start) / n * 1e6
    print(f"vectorized: {fast:.2f} s per 1M routed tokens ({NUM_LAYERS} layers, top-{TOP_K} of {NUM_EXPERTS})")
    print(f"on {n} tokens: vectorized {fast_small:.2f} s/1M tokens, Python loop {slow:.1f} s/1M tokens -> "
          f"{slow / fast_small:.0f}x")


if __name__ == "__main__":
    main()
