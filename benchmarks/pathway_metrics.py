"""Pathway-distance throughput on 10k OLMoE-like pathways (16 layers, 64 experts).

    python benchmarks/pathway_metrics.py [--samples 10000] [--reference-samples 150]

Prints the all-pairs mean distance time of moegrok (row blocks) against one raw rapidfuzz
`cdist` of the list against itself (rapidfuzz computes one triangle of that symmetric matrix,
but holds all N x N), and against a pure-Python Levenshtein on a subset, as ratios measured in
this run. Peak memory is each method's peak RSS growth in a forked child (rapidfuzz allocates
outside Python's tracemalloc).
"""

import argparse
import multiprocessing
import resource
import time

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from moegrok.metrics.pathways import mean_pairwise_distance, pathway_ids
from tests.reference.pathways import reference_levenshtein


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


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _child(fn, queue) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, seconds = timed(fn)
    queue.put((result, seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024))


def timed_in_child(fn):
    """(result, seconds, peak RSS growth in bytes) of fn run in a forked child."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(fn, queue))
    child.start()
    out = queue.get()
    child.join()
    return out


def raw_cdist_mean(items: list[str]) -> float:
    n = len(items)
    dist = process.cdist(items, items, scorer=Levenshtein.distance, workers=-1, dtype=np.int32)
    return float(np.triu(dist, k=1).sum(dtype=np.float64) / (n * (n - 1) // 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--reference-samples", type=int, default=150)
    args = parser.parse_args()
    items = olmoe_like_pathways(args.samples)
    n = len(items)
    pairs = n * (n - 1) // 2
    print(f"{n} pathways, mean length {np.mean([len(s) for s in items]):.1f} symbols, {pairs:,} pairs")

    ours, ours_s, ours_peak = timed_in_child(lambda: mean_pairwise_distance(items, max_pairs=pairs)[0])
    raw, raw_s, raw_peak = timed_in_child(lambda: raw_cdist_mean(items))
    assert abs(raw - ours) < 1e-9, (raw, ours)
    mib = 2**20
    for label, secs, peak in (("moegrok mean_pairwise_distance", ours_s, ours_peak),
                              ("raw rapidfuzz cdist (N x N)", raw_s, raw_peak)):
        print(f"{label:31s} {secs:7.2f} s {pairs / secs:12,.0f} pairs/s  peak RSS +{peak / mib:7.1f} MiB")
    print(f"throughput ratio moegrok / raw cdist: {raw_s / ours_s:.2f}x (target >= 0.8x); "
          f"peak memory ratio raw / moegrok: {raw_peak / max(ours_peak, 1):.1f}x")

    subset = items[: args.reference_samples]
    sub_pairs = len(subset) * (len(subset) - 1) // 2
    (fast, _, _), fast_s = timed(lambda: mean_pairwise_distance(subset))
    ref, ref_s = timed(lambda: np.mean([reference_levenshtein(a, b) for i, a in enumerate(subset)
                                           for b in subset[i + 1 :]]))
    assert abs(ref - fast) < 1e-9
    print(f"pure-Python reference on {len(subset)} pathways ({sub_pairs:,} pairs): {ref_s:.2f} s vs moegrok "
          f"{fast_s:.4f} s -> {ref_s / fast_s:,.0f}x faster")


if __name__ == "__main__":
    main()
