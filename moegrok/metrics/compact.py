"""Compact routing tables: what the pathway metrics need, at a fraction of the bytes.

A token-level routing table stores every token's top-k ids and weights (at OLMoE-1B-7B's shape,
16 layers x top-8: a few hundred bytes per token). The pathway metrics only need, per sample, the
token-averaged routing weight of every expert per layer (g, L x E values) for each positions
variant. A compact table keeps those (`mean_weights`, `mean_weights_answer`, ...; float32) and
keeps the token-level columns (topk_ids, topk_weights, input_ids) only for a chosen subset of
samples -- what the routing analyses (saturation, co-activation, vocabulary) read; the other rows
hold nulls there. Pathway features computed from either form are the same.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moegrok.metrics.pathways import MEAN_WEIGHTS, positions_suffix, routing_shape, sample_mean_weights

TOKEN_COLUMNS = ("topk_ids", "topk_weights", "input_ids")


def compact_table(table: pa.Table, *, positions: list[str], keep_tokens: Collection[str]) -> pa.Table:
    """The compact form of a token-level routing table: g per positions variant, and token-level
    columns only for the rows whose sample id is in `keep_tokens`."""
    num_layers, num_experts, _ = routing_shape(table)
    keep = pc.is_in(table["sample_id"], value_set=pa.array(sorted(keep_tokens), pa.string()))
    columns = {}
    for name in table.column_names:
        column = table[name]
        columns[name] = pc.if_else(keep, column, pa.scalar(None, column.type)) if name in TOKEN_COLUMNS else column
    for variant in positions:
        g_NLE = sample_mean_weights(table, positions=variant, num_layers=num_layers, num_experts=num_experts)
        flat = pa.array(g_NLE.astype(np.float32).ravel())
        offsets = pa.array(np.arange(table.num_rows + 1, dtype=np.int32) * num_layers * num_experts)
        columns[MEAN_WEIGHTS + positions_suffix(variant)] = pa.ListArray.from_arrays(offsets, flat)
    return pa.table(columns).replace_schema_metadata(table.schema.metadata)


def token_rows(table: pa.Table) -> pa.Table:
    """The rows that keep token-level routing (all of them in a token-level table)."""
    return table.filter(pc.is_valid(table["topk_ids"])) if table["topk_ids"].null_count else table
