"""The OLMoE paper's routing analyses in the reduce stage: one Ray task per recorded shard
computes additive statistics (routing_analyses.py), the driver sums them per (checkpoint,
group) and writes routing_analyses.parquet, coactivation.parquet, domain_specialization.parquet
and per-checkpoint means for metrics.parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray

from moegrok.checkpoints import CheckpointRef
from moegrok.config import MonitorConfig
from moegrok.pathways import routing_shape
from moegrok.routing_analyses import finalize_statistics, merge_statistics, shard_statistics
from moegrok.store import RunDir, write_parquet

METRIC_COLUMNS = {"saturation": "router_saturation", "top1_agreement": "top1_agreement",
                  "domain_specialization_max": "domain_specialization", "load_entropy": "load_entropy",
                  "vocab_specialization": "vocab_specialization"}


@ray.remote
def _shard_task(path: str, reference_path: str | None, with_coactivation: bool) -> dict:
    table = pq.read_table(path)
    num_layers, num_experts, top_k = routing_shape(table)
    reference = pq.read_table(reference_path) if reference_path else None
    return shard_statistics(table, reference, num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                            with_coactivation=with_coactivation)


def routing_analyses(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef],
                     units: dict[tuple[str, int], Path]) -> pd.DataFrame:
    """Per-layer tables into the run dir; returns (checkpoint, group) layer means for metrics."""
    names = [ref.name for ref in refs if any(key[0] == ref.name for key in units)]
    reference = cfg.metrics.saturation_reference or names[-1]
    futures = {
        (name, shard): _shard_task.remote(
            str(path), str(units[reference, shard]) if (reference, shard) in units else None, name == reference)
        for (name, shard), path in units.items()
    }
    per_unit = dict(zip(futures, ray.get(list(futures.values())), strict=True))
    top_k = routing_shape(pq.read_table(next(iter(units.values())), columns=["loss"]))[2]
    steps = {ref.name: ref.step for ref in refs}
    layer_rows, coactivation_rows, specialization_rows = [], [], []
    for name in names:
        groups = sorted({g for (n, _), stats in per_unit.items() if n == name for g in stats})
        for group in groups:
            merged = merge_statistics([stats[group] for (n, _), stats in per_unit.items()
                                       if n == name and group in stats])
            num_experts = merged["expert_counts"].shape[1]
            final = finalize_statistics(merged, num_experts=num_experts, top_k=top_k,
                                        min_count=cfg.metrics.vocab_min_count)
            for layer in range(merged["expert_counts"].shape[0]):
                layer_rows.append({"checkpoint": name, "step": steps[name], "group": group, "layer": layer,
                                   **{k: float(v[layer]) for k, v in final.items()}})
            if name == reference:
                ratio = merged["expert_counts"] / max(float(merged["tokens"][0]), 1) / (top_k / num_experts)
                specialization_rows += [{"checkpoint": name, "group": group, "layer": layer, "expert": expert,
                                         "ratio": float(ratio[layer, expert])}
                                        for layer in range(ratio.shape[0]) for expert in range(num_experts)]
                if "coactivation" in merged:
                    coactivation_rows += _coactivation_rows(name, merged)
    layers = pd.DataFrame(layer_rows)
    write_parquet(layers, run.root / "routing_analyses.parquet")
    write_parquet(pd.DataFrame(coactivation_rows), run.root / "coactivation.parquet")
    write_parquet(pd.DataFrame(specialization_rows), run.root / "domain_specialization.parquet")
    means = layers[layers["group"] != "*"].groupby(["checkpoint", "group"])[list(METRIC_COLUMNS)].mean()
    return means.rename(columns=METRIC_COLUMNS).reset_index()


def _coactivation_rows(name: str, merged: dict) -> list[dict]:
    selected = merged["expert_counts"].astype(np.float64)[:, :, None]
    rows = [np.divide(merged[key], selected, out=np.zeros(merged[key].shape), where=selected > 0)
            for key in ("coactivation", "coactivation_adjacent")]
    num_layers, num_experts = selected.shape[:2]
    return [{"checkpoint": name, "layer": layer, "expert_a": a, "expert_b": b,
             "probability": float(rows[0][layer, a, b]), "probability_adjacent": float(rows[1][layer, a, b])}
            for layer in range(num_layers) for a in range(num_experts) for b in range(num_experts)]
