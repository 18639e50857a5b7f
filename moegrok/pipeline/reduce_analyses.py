"""The OLMoE paper's routing analyses in the reduce stage, as units that sum the additive
statistics of routing shards (moegrok/routing/analyses.py) and finalize them per group and layer:

* analyses (checkpoint): load balance, domain and vocabulary specialization, and router
  saturation against the *previous* checkpoint (`saturation_previous`, `top1_previous`): a
  monitor, it needs nothing later than the checkpoint itself;
* saturation (a run of up to SATURATION_CHUNK checkpoints): saturation against the reference
  checkpoint (`metrics.routing_analyses.saturation_reference`, by default the last: the paper's form;
  retrospective, so every unit re-runs when a later checkpoint arrives, which is why a unit covers
  several checkpoints and reads the reference's shards once);
* reference: co-activation and domain specialization at the reference checkpoint.
The driver joins the small per-checkpoint parts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa

from moegrok.config import RoutingAnalysesConfig, SweepConfig
from moegrok.data.checkpoints import CheckpointRef
from moegrok.metrics.compact import token_rows
from moegrok.metrics.pathways import routing_shape
from moegrok.pipeline.executor import Unit
from moegrok.routing.analyses import (
    coactivation,
    domain_specialization,
    finalize_statistics,
    merge_statistics,
    shard_statistics,
)
from moegrok.store import RunDir, read_parquet, read_table, write_parquet

# layer means of these per-layer columns go into metrics.parquet under these names
METRIC_COLUMNS = {"saturation": "router_saturation", "top1_agreement": "top1_agreement",
                  "saturation_previous": "router_saturation_previous", "top1_previous": "top1_previous",
                  "domain_specialization_max": "domain_specialization", "load_entropy": "load_entropy",
                  "vocab_specialization": "vocab_specialization"}
REFERENCE_COLUMNS = ("saturation", "top1_agreement")
# checkpoints per saturation unit: adding a checkpoint re-runs all of them (the reference moves), and
# one unit per checkpoint cost more in dispatch and in re-reading the reference than in computing
SATURATION_CHUNK = 32


def _read_tokens(path: str) -> pa.Table:
    return token_rows(read_table(path))  # compact tables keep tokens for a subset only


def _merged(shards: list[tuple[str, str | None]], *, with_coactivation: bool,
            read_paired: Callable[[str], pa.Table] = _read_tokens) -> tuple[dict, tuple[int, int, int]]:
    """Per group, the statistics of these routing shards (each against its paired shard, if any)."""
    per_group: dict[str, list] = {}
    shape = (0, 0, 0)
    for path, paired in shards:
        table = _read_tokens(path)
        shape = routing_shape(table)
        reference = read_paired(paired) if paired else None
        stats = shard_statistics(table, reference, num_layers=shape[0], num_experts=shape[1], top_k=shape[2],
                                 with_coactivation=with_coactivation)
        for group, group_stats in stats.items():
            per_group.setdefault(group, []).append(group_stats)
    return {group: merge_statistics(parts) for group, parts in sorted(per_group.items())}, shape


def _layer_rows(ref: CheckpointRef, merged: dict, shape: tuple[int, int, int], *, min_count: int,
                columns: dict[str, str]) -> list[dict]:
    num_layers, num_experts, top_k = shape
    rows = []
    for group, stats in merged.items():
        final = finalize_statistics(stats, num_experts=num_experts, top_k=top_k, min_count=min_count)
        rows += [{"checkpoint": ref.name, "step": ref.step, "group": group, "layer": layer,
                  **{name: float(final[key][layer]) for key, name in columns.items()}} for layer in range(num_layers)]
    return rows


def compute_analyses(unit: Unit, *, vocab_min_count: int) -> dict:
    """Per-layer analyses of one checkpoint, saturation against the previous checkpoint."""
    merged, shape = _merged(unit.payload["shards"], with_coactivation=False)
    columns = {"saturation": "saturation_previous", "top1_agreement": "top1_previous",
               **{key: key for key in ("domain_specialization_max", "load_entropy", "load_max_over_mean",
                                       "vocab_specialization")}}
    rows = _layer_rows(unit.payload["ref"], merged, shape, min_count=vocab_min_count, columns=columns)
    write_parquet(pd.DataFrame(rows), unit.output)
    return {"rows": len(rows)}


def compute_saturation(unit: Unit, *, vocab_min_count: int) -> dict:
    """Per-layer saturation of a run of checkpoints against the reference checkpoint, whose shards
    are read once."""
    read_reference = functools.cache(_read_tokens)
    rows = []
    for ref, shards in zip(unit.payload["refs"], unit.payload["shards"], strict=True):
        merged, shape = _merged(shards, with_coactivation=False, read_paired=read_reference)
        rows += _layer_rows(ref, merged, shape, min_count=vocab_min_count,
                            columns={key: key for key in REFERENCE_COLUMNS})
    write_parquet(pd.DataFrame(rows), unit.output)
    return {"rows": len(rows)}


def compute_reference(unit: Unit) -> dict:
    """Co-activation (all groups) and domain specialization (per group) at the reference checkpoint."""
    merged, (num_layers, num_experts, top_k) = _merged(unit.payload["shards"], with_coactivation=True)
    ref: CheckpointRef = unit.payload["ref"]
    specialization = [{"checkpoint": ref.name, "group": group, "layer": layer, "expert": expert,
                       "ratio": float(ratio_LE[layer, expert])}
                      for group, stats in merged.items() for ratio_LE in [domain_specialization(stats, top_k=top_k)]
                      for layer in range(num_layers) for expert in range(num_experts)]
    both_LEE, adjacent_LEE = coactivation(merged["*"]), coactivation(merged["*"], adjacent=True)
    pairs = [{"checkpoint": ref.name, "layer": layer, "expert_a": a, "expert_b": b,
              "probability": float(both_LEE[layer, a, b]), "probability_adjacent": float(adjacent_LEE[layer, a, b])}
             for layer in range(num_layers) for a in range(num_experts) for b in range(num_experts)]
    write_parquet(pd.DataFrame(specialization), unit.payload["specialization"])
    write_parquet(pd.DataFrame(pairs), unit.output)
    return {"rows": len(pairs)}


def computes(settings: RoutingAnalysesConfig) -> dict[str, Callable[[Unit], dict]]:
    """The compute function of each kind of unit."""
    return {"analyses": functools.partial(compute_analyses, vocab_min_count=settings.vocab_min_count),
            "saturation": functools.partial(compute_saturation, vocab_min_count=settings.vocab_min_count),
            "reference": compute_reference}


def analysis_units(cfg: SweepConfig, run: RunDir, refs: list[CheckpointRef],
                   recorded: dict[tuple[str, int], tuple[Path, str]], parts: Path) -> dict[str, list[Unit]]:
    """The units by kind ("analyses", "saturation", "reference"); `recorded` maps (checkpoint,
    shard) to the routing file and its fingerprint."""
    names = [ref.name for ref in refs if any(name == ref.name for name, _ in recorded)]
    by_name = {ref.name: ref for ref in refs}
    setting = cfg.metrics.routing_analyses.saturation_reference
    reference = None if setting == "none" else names[-1] if setting == "last" else setting
    if reference is not None and reference not in names:
        raise ValueError(f"metrics.routing_analyses.saturation_reference={setting!r}: no recorded checkpoint of "
                         "that name")

    def paired(name: str, other: str | None) -> tuple[list, dict]:
        shards = sorted(index for n, index in recorded if n == name)
        against = [recorded.get((other, index)) for index in shards]
        return ([(str(recorded[name, i][0]), None if r is None else str(r[0])) for i, r in zip(shards, against,
                                                                                                 strict=True)],
                {"routing": [recorded[name, i][1] for i in shards], "paired routing": [r and r[1] for r in against]})

    units: dict[str, list[Unit]] = {"analyses": [], "saturation": [], "reference": []}
    for position, name in enumerate(names):
        shards, inputs = paired(name, names[position - 1] if position else None)
        units["analyses"].append(Unit(name, name, parts / "analyses" / f"{name}.parquet",
                                      {**inputs, "metrics.routing_analyses.vocab_min_count":
                                       cfg.metrics.routing_analyses.vocab_min_count},
                                      payload={"ref": by_name[name], "shards": shards}))
    if reference is not None:
        for start in range(0, len(names), SATURATION_CHUNK):
            chunk = names[start:start + SATURATION_CHUNK]
            against = [paired(name, reference) for name in chunk]
            output = parts / "saturation" / f"{chunk[0]}+{len(chunk)}.parquet"
            units["saturation"].append(Unit(
                f"saturation {chunk[0]}..{chunk[-1]}", chunk[0], output,
                {"checkpoints": chunk, **{key: [inputs[key] for _, inputs in against]
                                          for key in ("routing", "paired routing")}},
                payload={"refs": [by_name[name] for name in chunk], "shards": [shards for shards, _ in against]}))
        shards, inputs = paired(reference, None)
        units["reference"].append(Unit(
            f"reference {reference}", reference, parts / "reference" / "coactivation.parquet", inputs,
            payload={"ref": by_name[reference], "shards": shards,
                     "specialization": str(parts / "reference" / "specialization.parquet")}))
    return units


def assemble_analyses(units: dict[str, list[Unit]], finished) -> dict[str, pd.DataFrame]:
    """The routing analyses' tables from the finished parts (`finished(units)` reads them): per
    layer, co-activation and domain specialization at the reference checkpoint, and the
    (checkpoint, group) layer means that go into metrics.parquet (key "means")."""
    frames = finished(units["analyses"])
    layers = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    saturation = finished(units["saturation"])
    if len(layers) and saturation:
        layers = layers.merge(pd.concat(saturation, ignore_index=True), on=["checkpoint", "step", "group", "layer"],
                              how="left")
    tables = {"routing_analyses": layers, "coactivation": pd.DataFrame(), "specialization": pd.DataFrame()}
    for unit in units["reference"]:
        if finished([unit]):
            tables["coactivation"] = read_parquet(unit.output)
            tables["specialization"] = read_parquet(unit.payload["specialization"])
    present = [column for column in METRIC_COLUMNS if column in layers]
    if layers.empty:
        tables["means"] = pd.DataFrame(columns=["checkpoint", "group"])
    else:
        means = layers[layers["group"] != "*"].groupby(["checkpoint", "group"])[present].mean()
        tables["means"] = means.rename(columns=METRIC_COLUMNS).reset_index()
    return tables
