"""Slow, obviously correct references of the pathway metrics (moegrok/metrics/pathways.py computes
them fast; the tests and benchmarks/pathway_metrics.py check one against the other)."""


def reference_levenshtein(a, b) -> int:
    """Edit distance of two sequences, by the textbook dynamic programme."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]
