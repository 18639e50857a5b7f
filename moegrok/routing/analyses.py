"""The OLMoE paper's routing analyses over moegrok routing tables (vectorized, no Ray).

Each analysis is computed from additive statistics, so a sweep sums them over routing shards
(`shard_statistics`, `merge_statistics`) and finalizes once per checkpoint and group:

* Router saturation: share of a checkpoint's top-k experts that are also in a reference
  checkpoint's top-k for the same token, and top-1 agreement, per layer.
* Expert co-activation: P(b selected | a selected) over all pairs in a token's top-k;
  `coactivation_adjacent` counts only neighbours in the top-k list sorted by weight, the form of
  allenai/OLMoE `scripts/run_moe_analysis.py`, under its own name.
* Domain specialization: an expert's share of a group's tokens (tokens that select it) divided
  by the uniform share k/E; 1.0 = no specialization.
* Vocabulary specialization: per input token id seen at least `min_count` times, the share of
  its occurrences routed (top-1) to its most frequent expert, averaged over token ids.
* Load balance: entropy of expert usage (normalized by log E) and max/mean load.

Inputs are token-major arrays built by `token_arrays`: ids_LNK in router order. Token order is
the table's sample order, then position, so two checkpoints recorded on the same samples line
up token by token. The tests hold a direct (non-additive) reference of every analysis.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def token_arrays(table: pa.Table, *, num_layers: int, top_k: int, with_input_ids: bool = False):
    """(sample_ids, group per token, ids_LNK, input_ids_N or None) from a routing table."""
    ids_col = table["topk_ids"].combine_chunks()
    ids_flat = ids_col.flatten().to_numpy()
    offsets = ids_col.offsets.to_numpy() - ids_col.offsets.to_numpy()[0]
    num_tokens = table["num_tokens"].to_numpy()
    parts = [ids_flat[offsets[i] : offsets[i + 1]].reshape(num_layers, num_tokens[i], top_k)
             for i in range(table.num_rows)]
    ids_LNK = np.concatenate(parts, axis=1) if parts else np.zeros((num_layers, 0, top_k), np.int16)
    groups_N = np.repeat(np.asarray(table["group"].to_pylist(), dtype=object), num_tokens)
    input_ids_N = None
    if with_input_ids:
        if "input_ids" not in table.column_names:
            raise ValueError("vocabulary specialization needs the input_ids column: set record.keep_input_ids=true")
        input_ids_N = table["input_ids"].combine_chunks().flatten().to_numpy()
    return table["sample_id"].to_pylist(), groups_N, ids_LNK, input_ids_N


def expert_counts(ids_LNK: np.ndarray, num_experts: int) -> np.ndarray:
    """(L, E) number of tokens selecting each expert (any top-k slot)."""
    return np.stack([np.bincount(ids_NK.ravel(), minlength=num_experts) for ids_NK in ids_LNK.astype(np.int64)])


def coactivation_counts(ids_LNK: np.ndarray, num_experts: int, *, adjacent: bool = False) -> np.ndarray:
    """(L, E, E) counts of tokens where a and b are both selected (a != b); with `adjacent`,
    only pairs that are neighbours in the weight-sorted top-k list (both directions)."""
    num_layers, _, k = ids_LNK.shape
    # each unordered pair of slots once; the (b, a) counts are the transpose
    pairs = [(j, j + 1) for j in range(k - 1)] if adjacent else [(i, j) for i in range(k) for j in range(i + 1, k)]
    counts = np.zeros((num_layers, num_experts * num_experts), dtype=np.int64)
    for layer, ids_NK in enumerate(ids_LNK.astype(np.int64)):
        for i, j in pairs:
            counts[layer] += np.bincount(ids_NK[:, i] * num_experts + ids_NK[:, j], minlength=counts.shape[1])
    counts_LEE = counts.reshape(num_layers, num_experts, num_experts)
    return counts_LEE + counts_LEE.transpose(0, 2, 1)


def _shared_count(ids_NK: np.ndarray, reference_NK: np.ndarray) -> int:
    """Number of top-k ids also in the reference's top-k. A token's top-k ids are distinct, so the
    shared ones are the equal neighbours of its 2k ids sorted together (3x faster than a
    (tokens, k, k) comparison)."""
    both = np.sort(np.concatenate([ids_NK, reference_NK], axis=1), axis=1)
    return int(np.count_nonzero(both[:, 1:] == both[:, :-1]))


def _vocab_pairs(ids_LNK: np.ndarray, input_ids_N: np.ndarray, num_experts: int) -> np.ndarray:
    """(M, 4) rows (layer, token id, top-1 expert, count): sparse counts that add across shards."""
    rows = []
    for layer, top1_N in enumerate(ids_LNK[..., 0].astype(np.int64)):
        keys, counts = np.unique(input_ids_N.astype(np.int64) * num_experts + top1_N, return_counts=True)
        rows.append(np.stack([np.full_like(keys, layer), keys // num_experts, keys % num_experts, counts], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 4), np.int64)


def token_statistics(ids_LNK: np.ndarray, *, num_experts: int, reference_LNK: np.ndarray | None = None,
                     input_ids_N: np.ndarray | None = None, with_coactivation: bool = False) -> dict[str, np.ndarray]:
    """Additive statistics of a set of tokens (sums over tokens; see `merge_statistics`)."""
    num_tokens = ids_LNK.shape[1]
    stats = {"tokens": np.array([num_tokens]), "expert_counts": expert_counts(ids_LNK, num_experts)}
    if reference_LNK is not None:
        if ids_LNK.shape != reference_LNK.shape:
            raise ValueError(f"tokens do not line up: {ids_LNK.shape} vs reference {reference_LNK.shape}")
        if num_tokens == 0:  # e.g. a shard none of whose samples keep token-level routing
            stats["saturation_sum"] = stats["top1_sum"] = np.zeros(ids_LNK.shape[0])
        else:  # per-layer shares over these tokens, weighted by their count so that shards add up
            shared_L = np.array([_shared_count(ids_NK, ref_NK) / ids_NK.size
                                 for ids_NK, ref_NK in zip(ids_LNK, reference_LNK, strict=True)])
            stats["saturation_sum"] = shared_L * num_tokens
            stats["top1_sum"] = (ids_LNK[..., 0] == reference_LNK[..., 0]).mean(axis=1) * num_tokens
    if input_ids_N is not None:
        stats["vocab_pairs"] = _vocab_pairs(ids_LNK, input_ids_N, num_experts)
    if with_coactivation:
        stats["coactivation"] = coactivation_counts(ids_LNK, num_experts)
        stats["coactivation_adjacent"] = coactivation_counts(ids_LNK, num_experts, adjacent=True)
    return stats


def shard_statistics(table: pa.Table, reference: pa.Table | None, *, num_layers: int, num_experts: int,
                     top_k: int, with_coactivation: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Additive statistics of one routing shard per group (and "*" for all groups; co-activation
    only there). `reference` is the same shard recorded on the reference checkpoint (None: no
    saturation)."""
    with_vocab = "input_ids" in table.column_names
    sample_ids, groups_N, ids_LNK, input_ids_N = token_arrays(table, num_layers=num_layers, top_k=top_k,
                                                              with_input_ids=with_vocab)
    ref_LNK = None
    if reference is not None:
        ref_ids, _, ref_LNK, _ = token_arrays(reference, num_layers=num_layers, top_k=top_k)
        if ref_ids != sample_ids:
            raise ValueError("reference shard holds other samples (or another order); tokens cannot line up")
    out = {}
    for group in ["*", *sorted(set(groups_N))]:
        mask = slice(None) if group == "*" else groups_N == group
        out[group] = token_statistics(
            ids_LNK[:, mask], num_experts=num_experts, reference_LNK=None if ref_LNK is None else ref_LNK[:, mask],
            input_ids_N=input_ids_N[mask] if with_vocab else None, with_coactivation=with_coactivation and group == "*")
    return out


def merge_statistics(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    merged: dict[str, np.ndarray] = {}
    for part in parts:
        for key, value in part.items():
            if key == "vocab_pairs":
                merged[key] = np.concatenate([merged[key], value]) if key in merged else value
            else:
                merged[key] = merged[key] + value if key in merged else value.copy()
    return merged


def domain_specialization(stats: dict[str, np.ndarray], *, top_k: int) -> np.ndarray:
    """(L, E) share of the tokens that select each expert, relative to the uniform k/E."""
    counts = stats["expert_counts"].astype(np.float64)
    tokens = float(stats["tokens"][0])
    if tokens == 0:
        return np.full(counts.shape, np.nan)
    return counts / tokens / (top_k / counts.shape[1])


def coactivation(stats: dict[str, np.ndarray], *, adjacent: bool = False) -> np.ndarray:
    """(L, E, E) P(b selected | a selected), rows a; 0 where a is never selected."""
    pair_counts = stats["coactivation_adjacent" if adjacent else "coactivation"]
    selected = stats["expert_counts"].astype(np.float64)[:, :, None]
    return np.divide(pair_counts, selected, out=np.zeros(pair_counts.shape), where=selected > 0)


def _vocabulary_specialization(pairs: np.ndarray, *, num_layers: int, num_experts: int,
                               min_count: int) -> np.ndarray:
    out = np.full(num_layers, np.nan)
    for layer in range(num_layers):
        rows = pairs[pairs[:, 0] == layer]
        keys, inverse = np.unique(rows[:, 1] * num_experts + rows[:, 2], return_inverse=True)
        counts_pairs = np.bincount(inverse, weights=rows[:, 3])
        token_ids, token_of_pair = np.unique(keys // num_experts, return_inverse=True)
        totals = np.bincount(token_of_pair, weights=counts_pairs)
        best = np.zeros(len(token_ids))
        np.maximum.at(best, token_of_pair, counts_pairs)
        frequent = totals >= min_count
        if frequent.any():
            out[layer] = float((best[frequent] / totals[frequent]).mean())
    return out


def finalize_statistics(stats: dict[str, np.ndarray], *, num_experts: int, top_k: int,
                        min_count: int = 10) -> dict[str, np.ndarray]:
    """Per-layer values from merged statistics: saturation, top1_agreement,
    domain_specialization_max, load_entropy, load_max_over_mean, vocab_specialization."""
    tokens = float(stats["tokens"][0])
    counts = stats["expert_counts"].astype(np.float64)
    num_layers = counts.shape[0]
    usage = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    entropy = -np.sum(np.where(usage > 0, usage * np.log(np.where(usage > 0, usage, 1)), 0.0), axis=1)
    no_reference = np.full(num_layers, np.nan)
    return {
        "domain_specialization_max": domain_specialization(stats, top_k=top_k).max(axis=1),
        "load_entropy": entropy / np.log(num_experts),
        "load_max_over_mean": counts.max(axis=1) / np.maximum(counts.mean(axis=1), 1e-12),
        "saturation": stats["saturation_sum"] / tokens if "saturation_sum" in stats else no_reference,
        "top1_agreement": stats["top1_sum"] / tokens if "top1_sum" in stats else no_reference,
        "vocab_specialization": (
            _vocabulary_specialization(stats["vocab_pairs"], num_layers=num_layers, num_experts=num_experts,
                                       min_count=min_count)
            if "vocab_pairs" in stats and len(stats["vocab_pairs"]) else np.full(num_layers, np.nan)),
    }
