"""Direct, loop-based references of the OLMoE paper's routing analyses (moegrok/routing/analyses.py
computes them from additive statistics; the tests check one against the other)."""

import itertools

import numpy as np


def ref_saturation(ids_LNK, reference_LNK):
    """Per layer: mean share of top-k ids also in the reference's top-k, and top-1 agreement."""
    k = ids_LNK.shape[2]
    shared = np.array([np.mean([len(set(a) & set(b)) / k for a, b in zip(ids_NK, ref_NK, strict=True)])
                       for ids_NK, ref_NK in zip(ids_LNK, reference_LNK, strict=True)])
    return shared, (ids_LNK[..., 0] == reference_LNK[..., 0]).mean(axis=1)


def ref_coactivation(ids_LNK, num_experts, *, adjacent=False):
    """(L, E, E) P(b selected | a selected), by a loop over tokens."""
    out = np.zeros((ids_LNK.shape[0], num_experts, num_experts))
    for layer, ids_NK in enumerate(ids_LNK):
        both, selected = np.zeros((num_experts, num_experts)), np.zeros(num_experts)
        for token in ids_NK:
            for a in token:
                selected[a] += 1
            pairs = itertools.pairwise(token) if adjacent else itertools.combinations(token, 2)
            for a, b in pairs:
                both[a, b] += 1
                both[b, a] += 1
        out[layer] = np.divide(both, selected[:, None], out=np.zeros_like(both), where=selected[:, None] > 0)
    return out


def ref_domain_specialization(ids_LNK, num_experts):
    num_tokens, k = ids_LNK.shape[1:]
    return np.stack([[np.sum(ids_NK == e) for e in range(num_experts)] for ids_NK in ids_LNK]) / num_tokens / (
        k / num_experts)


def ref_vocabulary_specialization(ids_LNK, input_ids_N, num_experts, *, min_count):
    out = []
    for ids_NK in ids_LNK:
        per_token = {}
        for token_id, top1 in zip(input_ids_N.tolist(), ids_NK[:, 0].tolist(), strict=True):
            per_token.setdefault(token_id, []).append(top1)
        shares = [max(experts.count(e) for e in set(experts)) / len(experts)
                  for experts in per_token.values() if len(experts) >= min_count]
        out.append(np.mean(shares) if shares else np.nan)
    return np.array(out)


def ref_load_balance(ids_LNK, num_experts):
    entropy, max_over_mean = [], []
    for ids_NK in ids_LNK:
        counts = np.array([np.sum(ids_NK == e) for e in range(num_experts)], dtype=float)
        share = counts / counts.sum()
        entropy.append(-sum(p * np.log(p) for p in share if p > 0) / np.log(num_experts))
        max_over_mean.append(counts.max() / counts.mean())
    return np.array(entropy), np.array(max_over_mean)
