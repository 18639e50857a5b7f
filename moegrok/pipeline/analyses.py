"""The OLMoE paper's routing analyses in the reduce stage: one unit per checkpoint sums the
additive statistics of its routing shards (moegrok/routing_analyses.py) and finalizes them per
group and layer; the reference checkpoint's unit also writes co-activation and domain
specialization. The driver joins the small per-checkpoint parts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from moegrok.checkpoints import CheckpointRef
from moegrok.compact import token_rows
from moegrok.config import MonitorConfig
from moegrok.pathways import routing_shape
from moegrok.pipeline.runner import Unit
from moegrok.routing_analyses import (
    coactivation,
    domain_specialization,
    finalize_statistics,
    merge_statistics,
    shard_statistics,
)
from moegrok.store import RunDir, write_parquet

# layer means of these per-layer columns go into metrics.parquet under these names
METRIC_COLUMNS = {"saturation": "router_saturation", "top1_agreement": "top1_agreement",
                  "domain_specialization_max": "domain_specialization", "load_entropy": "load_entropy",
                  "vocab_specialization": "vocab_specialization"}


def compute_analyses(unit: Unit, *, vocab_min_count: int) -> dict:
    """Per-layer routing analyses of one checkpoint; the reference checkpoint's unit also writes
    the co-activation and domain-specialization parts."""
    ref: CheckpointRef = unit.payload["ref"]
    is_reference = unit.payload["is_reference"]
    per_group: dict[str, list] = {}
    num_layers = num_experts = top_k = 0
    for path, reference_path in unit.payload["shards"]:
        table = token_rows(pq.read_table(path))  # compact tables keep tokens for a subset only
        num_layers, num_experts, top_k = routing_shape(table)
        reference = token_rows(pq.read_table(reference_path)) if reference_path else None
        stats = shard_statistics(table, reference, num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                                 with_coactivation=is_reference)
        for group, group_stats in stats.items():
            per_group.setdefault(group, []).append(group_stats)
    layer_rows, specialization_rows, coactivation_rows = [], [], []
    for group in sorted(per_group):
        merged = merge_statistics(per_group[group])
        final = finalize_statistics(merged, num_experts=num_experts, top_k=top_k, min_count=vocab_min_count)
        layer_rows += [{"checkpoint": ref.name, "step": ref.step, "group": group, "layer": layer,
                        **{k: float(v[layer]) for k, v in final.items()}} for layer in range(num_layers)]
        if is_reference:
            ratio_LE = domain_specialization(merged, top_k=top_k)
            specialization_rows += [{"checkpoint": ref.name, "group": group, "layer": layer, "expert": expert,
                                     "ratio": float(ratio_LE[layer, expert])}
                                    for layer in range(num_layers) for expert in range(num_experts)]
            if "coactivation" in merged:
                both_LEE, adjacent_LEE = coactivation(merged), coactivation(merged, adjacent=True)
                coactivation_rows += [{"checkpoint": ref.name, "layer": layer, "expert_a": a, "expert_b": b,
                                       "probability": float(both_LEE[layer, a, b]),
                                       "probability_adjacent": float(adjacent_LEE[layer, a, b])}
                                      for layer in range(num_layers) for a in range(num_experts)
                                      for b in range(num_experts)]
    if is_reference:
        write_parquet(pd.DataFrame(specialization_rows), unit.payload["specialization"])
        write_parquet(pd.DataFrame(coactivation_rows), unit.payload["coactivation"])
    write_parquet(pd.DataFrame(layer_rows), unit.output)
    return {"rows": len(layer_rows)}


def analysis_units(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef],
                   recorded: dict[tuple[str, int], tuple[Path, str]], parts: Path) -> list[Unit]:
    """One unit per recorded checkpoint; `recorded` maps (checkpoint, shard) to the routing file
    and its fingerprint."""
    names = [ref.name for ref in refs if any(name == ref.name for name, _ in recorded)]
    reference = cfg.metrics.saturation_reference or names[-1]
    units = []
    for ref in refs:
        if ref.name not in names:
            continue
        shards = sorted(index for name, index in recorded if name == ref.name)
        against = [recorded.get((reference, index)) for index in shards]
        is_reference = ref.name == reference
        units.append(Unit(
            ref.name, ref.name, parts / f"{ref.name}.parquet",
            {"routing": [recorded[ref.name, index][1] for index in shards],
             "reference routing": [None if r is None else r[1] for r in against],
             "metrics.saturation_reference": reference, "metrics.vocab_min_count": cfg.metrics.vocab_min_count},
            payload={"ref": ref, "is_reference": is_reference,
                     "shards": [(str(recorded[ref.name, index][0]), None if r is None else str(r[0]))
                                for index, r in zip(shards, against, strict=True)],
                     "coactivation": str(parts / f"{ref.name}.coactivation.parquet"),
                     "specialization": str(parts / f"{ref.name}.specialization.parquet")}))
    return units


def assemble_analyses(units: list[Unit], frames: list[pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The routing analyses' tables from the finished parts: per layer, co-activation and domain
    specialization at the reference checkpoint, and the (checkpoint, group) layer means that go
    into metrics.parquet (key "means")."""
    layers = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    reference = next((u for u in units if u.payload["is_reference"]), None)
    tables = {"routing_analyses": layers}
    for key in ("coactivation", "specialization"):
        part = Path(reference.payload[key]) if reference is not None else None
        tables[key] = pd.read_parquet(part) if part is not None and part.exists() else pd.DataFrame()
    if layers.empty:
        tables["means"] = pd.DataFrame(columns=["checkpoint", "group", *METRIC_COLUMNS.values()])
    else:
        means = layers[layers["group"] != "*"].groupby(["checkpoint", "group"])[list(METRIC_COLUMNS)].mean()
        tables["means"] = means.rename(columns=METRIC_COLUMNS).reset_index()
    return tables
