"""Pathways of training samples and the two pathway metrics (docs/metrics.md).

Per sample and MoE layer the routing weights are averaged over the sample's tokens (weights of
unselected experts count as 0); experts are ranked by that mean (ties: lower id first) and kept
until their cumulative share of the layer's total first exceeds `weight_share`. The pathway is the
kept experts layer by layer.

* Pathway distance: Levenshtein distance between two samples' pathways, averaged over the
  sample pairs of a group. Primary form over expert-id sequences (one symbol per expert, one
  separator per layer boundary); also the paper's character strings ("3,1,5-...-9,1"), a
  length-normalized form (distance / longer length) and per-layer distances.
* Pathway consistency: routing embedding e_l = sum_k g_l(k) W_l[k] from the router weight rows;
  c_l = cos(e_l, e_{l+1}); `mean_cos` = mean_l c_l and the paper's
  C = 1 - mean_l c_l / (max_l c_l + 1e-8). C is unbounded when max_l c_l is near 0 or negative.

Everything here is a pure function of Arrow/pandas tables and numpy arrays.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

EXPERT_CODE_OFFSET = 0x100  # expert e is the character chr(0x100 + e) in an id-level pathway
LAYER_SEPARATOR = "|"
POSITIONS = ("all", "answer")
PAIR_BLOCK_ROWS = 256


def routing_shape(table: pa.Table) -> tuple[int, int, int]:
    """(num_layers, num_experts, top_k) from a routing table's schema metadata."""
    meta = table.schema.metadata or {}
    try:
        return tuple(int(meta[key]) for key in (b"num_layers", b"num_experts", b"top_k"))  # type: ignore[return-value]
    except KeyError:
        raise ValueError("routing table has no num_layers/num_experts/top_k schema metadata") from None


def mean_layer_weights(
    topk_ids: np.ndarray,
    topk_weights: np.ndarray,
    *,
    num_tokens: int,
    num_prompt_tokens: int,
    num_layers: int,
    num_experts: int,
    positions: str = "all",
) -> np.ndarray:
    """Token-averaged routing weight of every expert per layer, g (L, E)."""
    ids_LTK = topk_ids.reshape(num_layers, num_tokens, -1).astype(np.int64)
    weights_LTK = topk_weights.reshape(num_layers, num_tokens, -1).astype(np.float64)
    if positions == "answer":  # the positions whose next token is scored
        window = slice(num_prompt_tokens - 1, num_tokens - 1)
        ids_LTK, weights_LTK = ids_LTK[:, window], weights_LTK[:, window]
    elif positions != "all":
        raise ValueError(f"metrics.positions={positions!r}: expected one of {POSITIONS}")
    num_positions = ids_LTK.shape[1]
    flat = (ids_LTK + num_experts * np.arange(num_layers)[:, None, None]).ravel()
    sums = np.bincount(flat, weights=weights_LTK.ravel(), minlength=num_layers * num_experts)
    return sums.reshape(num_layers, num_experts) / num_positions


def kept_experts(g_LE: np.ndarray, *, weight_share: float) -> list[np.ndarray]:
    """Per layer, the top-ranked experts whose cumulative share of the weight first exceeds `weight_share`."""
    out = []
    for g_E in g_LE:
        order = np.argsort(-g_E, kind="stable")
        total = g_E.sum()
        if total <= 0:
            out.append(order[:0])
            continue
        share = np.cumsum(g_E[order]) / total
        num_kept = min(int(np.searchsorted(share, weight_share, side="right")) + 1, int((g_E > 0).sum()))
        out.append(order[:num_kept])
    return out


def pathway_ids(layers: list[np.ndarray]) -> str:
    """Id-level pathway: one character per expert, a separator per layer boundary."""
    return LAYER_SEPARATOR.join("".join(chr(EXPERT_CODE_OFFSET + int(e)) for e in layer) for layer in layers)


def pathway_string(layers: list[np.ndarray]) -> str:
    """The paper's form: "3,1,5-...-9,1"."""
    return "-".join(",".join(str(int(e)) for e in layer) for layer in layers)


def consistency(g_LE: np.ndarray, routers_LED: np.ndarray) -> tuple[float, float]:
    """(mean_cos, C) of one sample from its mean routing weights and the router weight rows."""
    e_LD = np.einsum("le,led->ld", g_LE, routers_LED)
    norms = np.linalg.norm(e_LD, axis=1)
    cos_L1 = (e_LD[:-1] * e_LD[1:]).sum(axis=1) / np.maximum(norms[:-1] * norms[1:], 1e-12)
    if len(cos_L1) == 0:
        return float("nan"), float("nan")
    c_value = 1.0 - float(np.mean(cos_L1 / (cos_L1.max() + 1e-8)))
    return float(cos_L1.mean()), c_value


VARIANT_COLUMNS = ["pathway", "pathway_str", "layer_pathways", "pathway_length", "mean_cos", "consistency"]
SAMPLE_COLUMNS = [
    "checkpoint", "step", "sample_id", "group", "loss", "token_accuracy", "pathway", "pathway_str",
    "layer_pathways", "pathway_length", "mean_cos", "consistency",
]


MEAN_WEIGHTS = "mean_weights"  # compact routing tables store g (L*E per sample) under this name + suffix


def positions_suffix(positions: str) -> str:
    """Columns of a positions variant other than "all" carry its name as a suffix."""
    return "" if positions == "all" else f"_{positions}"


def sample_mean_weights(table: pa.Table, *, positions: str, num_layers: int, num_experts: int) -> np.ndarray:
    """g (N, L, E) of every row: stored in a compact table, else averaged from its tokens' top-k."""
    column = MEAN_WEIGHTS + positions_suffix(positions)
    if column in table.column_names:
        values = table[column].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return values.astype(np.float64).reshape(table.num_rows, num_layers, num_experts)
    ids_col = table["topk_ids"].combine_chunks()
    ids_flat = ids_col.flatten().to_numpy()
    weights_flat = table["topk_weights"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    offsets = ids_col.offsets.to_numpy() - ids_col.offsets.to_numpy()[0]
    num_tokens, num_prompt = table["num_tokens"].to_numpy(), table["num_prompt_tokens"].to_numpy()
    g_NLE = np.zeros((table.num_rows, num_layers, num_experts))
    for i in range(table.num_rows):
        span = slice(offsets[i], offsets[i + 1])
        g_NLE[i] = mean_layer_weights(ids_flat[span], weights_flat[span], num_tokens=int(num_tokens[i]),
                                      num_prompt_tokens=int(num_prompt[i]), num_layers=num_layers,
                                      num_experts=num_experts, positions=positions)
    return g_NLE


def sample_features(
    table: pa.Table,
    routers_LED: np.ndarray | None,
    *,
    weight_share: float = 0.7,
    positions: str = "all",
    shape: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """One row per sample: its pathway (id-level, paper string, per layer), pathway length
    (kept experts), consistency (mean_cos, C; NaN without router weights) and loss.
    `shape` = (num_layers, num_experts), read from the table's schema metadata if not given."""
    if not 0.0 < weight_share < 1.0:
        raise ValueError(f"metrics.weight_share={weight_share!r}: expected a number in (0, 1)")
    if positions not in POSITIONS:
        raise ValueError(f"metrics.positions={positions!r}: expected one of {POSITIONS}")
    num_layers, num_experts = shape if shape is not None else routing_shape(table)[:2]
    rows = []
    for g_LE in sample_mean_weights(table, positions=positions, num_layers=num_layers, num_experts=num_experts):
        layers = kept_experts(g_LE, weight_share=weight_share)
        mean_cos, c_value = (float("nan"), float("nan")) if routers_LED is None else consistency(g_LE, routers_LED)
        rows.append(
            (
                pathway_ids(layers),
                pathway_string(layers),
                ["".join(chr(EXPERT_CODE_OFFSET + int(e)) for e in layer) for layer in layers],
                int(sum(len(layer) for layer in layers)),
                mean_cos,
                c_value,
            )
        )
    features = pd.DataFrame(rows, columns=SAMPLE_COLUMNS[6:])
    meta = table.select(["checkpoint", "step", "sample_id", "group", "loss"]).to_pandas()
    meta["token_accuracy"] = (table["token_accuracy"].to_numpy() if "token_accuracy" in table.column_names
                              else np.nan)
    return pd.concat([meta, features], axis=1)[SAMPLE_COLUMNS]


# --------------------------------------------------------------------------- pairwise distances


def mean_pairwise_distance(
    items: list[str], *, scorer=Levenshtein.distance, max_pairs: int = 5_000_000, seed: int = 0
) -> tuple[float, int, str]:
    """Mean distance over all unordered pairs (exact, in row blocks) when there are at most
    `max_pairs` of them, else over `max_pairs` seeded random pairs. Returns (mean, pairs, mode)."""
    n = len(items)
    total_pairs = n * (n - 1) // 2
    if total_pairs == 0:
        return float("nan"), 0, "exact"
    if total_pairs <= max_pairs:
        # row blocks: the block against itself (rapidfuzz computes one triangle when queries is
        # choices) and against the rows after it -- each pair once, memory block x n
        total = 0.0
        for start in range(0, n, PAIR_BLOCK_ROWS):
            stop = min(start + PAIR_BLOCK_ROWS, n)
            rows = items[start:stop]
            square = process.cdist(rows, rows, scorer=scorer, workers=-1)
            total += float(np.triu(square, k=1).sum(dtype=np.float64))
            if stop < n:
                total += float(process.cdist(rows, items[stop:], scorer=scorer, workers=-1).sum(dtype=np.float64))
        return total / total_pairs, total_pairs, "exact"
    rng = np.random.default_rng(seed)
    first = rng.integers(n, size=max_pairs)
    second = rng.integers(n - 1, size=max_pairs)
    second += second >= first
    left = [items[i] for i in first]
    right = [items[j] for j in second]
    dist = process.cpdist(left, right, scorer=scorer, workers=-1)
    return float(dist.mean(dtype=np.float64)), max_pairs, "sampled"


def group_metrics(
    features: pd.DataFrame, *, max_pairs: int = 5_000_000, seed: int = 0, per_layer: bool = True
) -> dict:
    """Pathway metrics of one (checkpoint, group) from its samples' features. Samples are taken
    in sample_id order, so the result does not depend on the input row order."""
    features = features.sort_values("sample_id", kind="stable")
    if features.empty:
        nan = float("nan")
        return {"num_samples": 0, "pathway_distance": nan, "pathway_distance_chars": nan,
                "pathway_distance_norm": nan, "pathway_length": nan, "mean_cos": nan, "mean_cos_median": nan,
                "consistency": nan, "consistency_median": nan, "num_pairs": 0, "pairs": "exact",
                **({"layer_distance": []} if per_layer else {})}
    ids = features["pathway"].tolist()
    distance, num_pairs, mode = mean_pairwise_distance(ids, max_pairs=max_pairs, seed=seed)
    out = {
        "num_samples": len(features),
        "pathway_distance": distance,
        "pathway_distance_chars": mean_pairwise_distance(
            features["pathway_str"].tolist(), max_pairs=max_pairs, seed=seed)[0],
        "pathway_distance_norm": mean_pairwise_distance(
            ids, scorer=Levenshtein.normalized_distance, max_pairs=max_pairs, seed=seed)[0],
        "pathway_length": float(features["pathway_length"].mean()),
        "mean_cos": float(features["mean_cos"].mean()),
        "mean_cos_median": float(features["mean_cos"].median()),
        "consistency": float(features["consistency"].mean()),
        "consistency_median": float(features["consistency"].median()),
        "num_pairs": num_pairs,
        "pairs": mode,
    }
    if per_layer:
        layers = np.array(features["layer_pathways"].tolist(), dtype=object)
        out["layer_distance"] = [
            mean_pairwise_distance(list(layers[:, layer]), max_pairs=max_pairs, seed=seed)[0]
            for layer in range(layers.shape[1] if len(layers) else 0)
        ]
    return out
