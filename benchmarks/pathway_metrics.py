"""Pathway-distance throughput on 10k OLMoE-like pathways (16 layers, 64 experts).

    python benchmarks/pathway_metrics.py [--samples 10000] [--reference-samples 150]

Prints the all-pairs mean distance time of moegrok (upper triangle, row blocks) against raw
rapidfuzz `cdist` over the full matrix of the same sequences, and against a pure-Python
Levenshtein on a subset, as pairs/s ratios measured in this run, with peak traced memory.
"""

import argparse
import time
import tracemalloc

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from moegrok.pathways import mean_pairwise_distance, pathway_ids


def olmoe_like_pathways(num_samples: int, *, seed: int = 0) -> list[str]:
    """16 layers; each layer keeps 2-6 of 64 experts, drawn from a few shared 'routes' plus noise."""
    rng = np.random.default_rng(seed)
    routes = rng.integers(0, 64, size=(8, 16, 6))
    out = []
    for _ in range(num_samples):
        base = routes[rng.integers(8)]
        layers = []
        for layer in range(16):
            kept = base[layer, : rng.integers(2, 7)].copy()
            noise = rng.random(len(kept)) < 0.3
            kept[noise] = rng.integers(0, 64, size=noise.sum())
            layers.append(kept)
        out.append(pathway_ids(layers))
    return out


def reference_levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def timed(fn):
    tracemalloc.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--reference-samples", type=int, default=150)
    args = parser.parse_args()
    items = olmoe_like_pathways(args.samples)
    n = len(items)
    pairs = n * (n - 1) // 2
    print(f"{n} pathways, mean length {np.mean([len(s) for s in items]):.1f} symbols, {pairs:,} pairs")

    (ours, _, _), ours_s, ours_peak = timed(lambda: mean_pairwise_distance(items, max_pairs=pairs))
    raw, raw_s, raw_peak = timed(lambda: process.cdist(items, items, scorer=Levenshtein.distance, workers=-1,
                                                       dtype=np.int32))
    raw_mean = float(np.triu(raw, k=1).sum(dtype=np.float64) / pairs)
    del raw
    assert abs(raw_mean - ours) < 1e-9, (raw_mean, ours)
    ours_rate, raw_rate = pairs / ours_s, n * n / raw_s  # raw cdist computes both triangles
    mib = 2**20
    for label, secs, rate, peak in (("moegrok mean_pairwise_distance", ours_s, ours_rate, ours_peak),
                                    ("raw rapidfuzz cdist (N x N)", raw_s, raw_rate, raw_peak)):
        print(f"{label:31s} {secs:7.2f} s {rate:12,.0f} pairs/s  peak {peak / mib:7.1f} MiB")
    print(f"throughput ratio moegrok / raw cdist: {ours_rate / raw_rate:.2f}x (target >= 0.8x); wall-time ratio "
          f"raw / moegrok: {raw_s / ours_s:.2f}x; memory ratio raw / moegrok: {raw_peak / ours_peak:.1f}x")

    subset = items[: args.reference_samples]
    sub_pairs = len(subset) * (len(subset) - 1) // 2
    (fast, _, _), fast_s, _ = timed(lambda: mean_pairwise_distance(subset))
    ref, ref_s, _ = timed(lambda: np.mean([reference_levenshtein(a, b) for i, a in enumerate(subset)
                                           for b in subset[i + 1 :]]))
    assert abs(ref - fast) < 1e-9
    print(f"pure-Python reference on {len(subset)} pathways ({sub_pairs:,} pairs): {ref_s:.2f} s vs moegrok "
          f"{fast_s:.4f} s -> {ref_s / fast_s:,.0f}x faster")


if __name__ == "__main__":
    main()
