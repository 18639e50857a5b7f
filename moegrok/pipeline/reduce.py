"""Reduce stage: routing tables -> per-sample pathway features, the memorized set, metrics.

Units, each computed and written by a Ray worker and skipped when current:
* features (checkpoint x shard): a routing shard -> sample_metrics/<ckpt>/shardNNNNN.parquet,
  one row per sample (pathways, consistency, loss), every positions variant side by side;
* memorized (data group): every checkpoint's losses of the group's samples -> its samples'
  memorized-since steps (the paper's loss rule needs all checkpoints), memorized.parquet;
* metrics (checkpoint x sample set): one checkpoint's features -> a row per group
  (parts/metrics/<ckpt>/<sample set>.parquet), the embedding measure (MED) beside;
* analyses (checkpoint): its routing shards, and the reference checkpoint's for saturation ->
  per-layer routing analyses (parts/analyses/<ckpt>.parquet).
Routing is partitioned by checkpoint on disk, so a checkpoint's unit reads exactly its rows:
no shuffle. The driver only assembles the small per-checkpoint parts into metrics.parquet and
routing_analyses.parquet; it never holds routing or per-sample rows.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray
from safetensors.numpy import load_file

from moegrok.checkpoints import CheckpointRef
from moegrok.config import MemorizationConfig, MonitorConfig, SampleSet, as_plain
from moegrok.embedding import main_embedding_diff
from moegrok.memorization import select_memorized
from moegrok.metrics_table import checkpoint_features, set_row
from moegrok.pathways import routing_shape
from moegrok.pipeline.runner import StageResult, TaskPool, Unit, run_stage
from moegrok.routing_analyses import (
    coactivation,
    domain_specialization,
    finalize_statistics,
    merge_statistics,
    shard_statistics,
)
from moegrok.store import RunDir, done_fingerprint, fingerprint, mark_done, write_parquet

ANALYSIS_COLUMNS = {"saturation": "router_saturation", "top1_agreement": "top1_agreement",
                    "domain_specialization_max": "domain_specialization", "load_entropy": "load_entropy",
                    "vocab_specialization": "vocab_specialization"}


@functools.lru_cache(maxsize=8)
def _checkpoint_weights(path: str) -> dict[str, np.ndarray]:
    return load_file(path)


# --------------------------------------------------------------------------- units (on Ray workers)


def compute_features(unit: Unit, *, threshold: float, positions: list[str]) -> dict:
    routers_LED = _checkpoint_weights(unit.payload["weights"])["routers"]
    features = checkpoint_features(pq.read_table(unit.payload["routing"]), routers_LED, threshold=threshold,
                                   positions=positions)
    write_parquet(features, unit.output)
    return {"rows": len(features)}


def compute_metrics(unit: Unit, *, positions: list[str], max_pairs: int, seed: int) -> dict:
    """A row per group for one checkpoint and sample set; samples in sample_id order, columns
    Arrow-backed (means by Arrow's kernels)."""
    features = pq.read_table(unit.payload["features"]).to_pandas(types_mapper=pd.ArrowDtype)
    features = features.sort_values("sample_id", ignore_index=True)
    ref: CheckpointRef = unit.payload["ref"]
    if unit.payload["sample_set"] == SampleSet.memorized:
        memorized = pd.read_parquet(unit.payload["memorized"], columns=["sample_id", "memorized_since"])
        members = set(memorized.loc[memorized["memorized_since"] <= ref.step, "sample_id"])
        features = features[features["sample_id"].isin(members)]
    rows = [set_row(members, checkpoint=ref.name, step=ref.step, group=group, sample_set=unit.payload["sample_set"],
                    positions=positions, max_pairs=max_pairs, seed=seed)
            for group, members in features.groupby("group", sort=True)]
    for group in unit.payload["groups"]:  # a group with no member in this set still gets its row
        if group not in set(features["group"]):
            rows.append(set_row(features.iloc[:0], checkpoint=ref.name, step=ref.step, group=group,
                                sample_set=unit.payload["sample_set"], positions=positions, max_pairs=max_pairs,
                                seed=seed))
    frame = pd.DataFrame(rows).sort_values("group", ignore_index=True)
    weights = _checkpoint_weights(unit.payload["weights"])
    frame["med"] = main_embedding_diff(weights["residue_embeddings"]) if "residue_embeddings" in weights else np.nan
    write_parquet(frame, unit.output)
    return {"rows": len(frame)}


def compute_memorized(unit: Unit, *, memo: MemorizationConfig) -> dict:
    """The loss rule's memorized set of one data group, from every checkpoint's features."""
    losses = pq.read_table(unit.payload["features"], columns=["step", "sample_id", "group", "loss"],
                           filters=[("group", "=", unit.payload["group"])]).to_pandas()
    memorized = select_memorized(losses, delta=memo.delta, eps=memo.eps, target_fraction=memo.target_fraction)
    write_parquet(memorized, unit.output)
    return {"rows": len(memorized)}


def compute_analyses(unit: Unit, *, vocab_min_count: int) -> dict:
    """Per-layer routing analyses of one checkpoint; the reference checkpoint's unit also writes
    the co-activation and domain-specialization parts."""
    ref: CheckpointRef = unit.payload["ref"]
    is_reference = unit.payload["is_reference"]
    per_group: dict[str, list] = {}
    num_layers = num_experts = top_k = 0
    for path, reference_path in unit.payload["shards"]:
        table = pq.read_table(path)
        num_layers, num_experts, top_k = routing_shape(table)
        reference = pq.read_table(reference_path) if reference_path else None
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


# --------------------------------------------------------------------------- the stage (driver)


def _parts(run: RunDir) -> Path:
    return run.root / "parts"


def features_path(run: RunDir, checkpoint: str, shard: int) -> Path:
    return run.sample_metrics / checkpoint / f"shard{shard:05d}.parquet"


def _combine(stage: str, results: list[StageResult]) -> StageResult:
    combined = StageResult(stage)
    for result in results:
        combined.units += result.units
        combined.skipped += result.skipped
        combined.done += result.done
        combined.failures += result.failures
        combined.seconds += result.seconds
    return combined


def reduce_stage(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef], num_shards: int) -> StageResult:
    metrics_cfg = cfg.metrics
    positions = [str(p) for p in metrics_cfg.positions]
    routing = {(ref.name, index): (ref, run.routing_shard(ref.name, index)) for ref in refs
               for index in range(num_shards)}
    recorded = {key: (ref, path, done_fingerprint(path)) for key, (ref, path) in routing.items()}
    recorded = {key: value for key, value in recorded.items() if value[2] is not None}
    if not recorded:
        raise RuntimeError(f"no recorded routing in {run.root / 'routing'}: run the record stage first")
    pool = functools.partial(TaskPool, options={"num_cpus": 1}, max_in_flight=int(ray.cluster_resources()["CPU"]),
                             max_retries=cfg.record.max_retries)

    feature_units = [
        Unit(f"{name}/shard{index:05d}", name, features_path(run, name, index),
             fingerprint(routing_print, metrics_cfg.threshold, positions),
             payload={"routing": str(path), "weights": str(run.checkpoint_weights(name))})
        for (name, index), (ref, path, routing_print) in recorded.items()]
    features_of = functools.partial(compute_features, threshold=metrics_cfg.threshold, positions=positions)
    results = [run_stage("reduce features", feature_units, pool(features_of), progress=cfg.progress)]
    features = {}  # checkpoint -> fingerprints and paths of its features, when every recorded shard has them
    for unit in feature_units:
        features.setdefault(unit.checkpoint, []).append((done_fingerprint(unit.output), unit.output))
    features = {name: parts for name, parts in features.items() if all(fp for fp, _ in parts)}

    memo = metrics_cfg.memorization
    groups = sorted(set(pd.read_parquet(run.samples, columns=["group"])["group"]))
    all_prints = sorted(fp for parts in features.values() for fp, _ in parts)
    feature_files = [str(path) for parts in features.values() for _, path in parts]
    memorized_units = [Unit(f"memorized/{group}", "*", _parts(run) / "memorized" / f"group{index:04d}.parquet",
                            fingerprint(all_prints, group, as_plain(memo)),
                            payload={"group": group, "features": feature_files})
                       for index, group in enumerate(groups)]
    results.append(run_stage("reduce memorized", memorized_units,
                             pool(functools.partial(compute_memorized, memo=memo)), progress=False))
    memorized = _assemble_memorized(run, memorized_units)
    sample_sets = list(SampleSet) if memorized is not None else [SampleSet.all]
    if memorized is None:  # no memorized set: metrics of all samples only
        memorized = pd.DataFrame({"sample_id": [], "group": [], "eps": [], "memorized_since": []})
    memorized_prints = _memorized_prints(memorized, [ref.step for ref in refs])

    settings = (positions, metrics_cfg.max_pairs, metrics_cfg.seed)
    metric_units = []
    for ref in refs:
        if ref.name not in features:
            continue
        weights = run.checkpoint_weights(ref.name)
        feature_prints = [fp for fp, _ in features[ref.name]]
        for sample_set in sample_sets:
            depends = memorized_prints[ref.step] if sample_set == SampleSet.memorized else None
            metric_units.append(Unit(
                f"{ref.name}/{sample_set}", ref.name, _parts(run) / "metrics" / ref.name / f"{sample_set}.parquet",
                fingerprint(feature_prints, settings, str(sample_set), depends, groups),
                payload={"ref": ref, "sample_set": sample_set, "features": [str(p) for _, p in features[ref.name]],
                         "memorized": str(run.memorized), "weights": str(weights), "groups": groups}))
    results.append(run_stage("reduce metrics", metric_units,
                             pool(functools.partial(compute_metrics, positions=positions,
                                                    max_pairs=metrics_cfg.max_pairs, seed=metrics_cfg.seed)),
                             progress=cfg.progress))
    analyses = None
    if metrics_cfg.routing_analyses:
        analysis_units = _analysis_units(cfg, run, refs, recorded)
        results.append(run_stage("reduce analyses", analysis_units,
                                 pool(functools.partial(compute_analyses,
                                                        vocab_min_count=metrics_cfg.vocab_min_count)),
                                 progress=cfg.progress))
        analyses = _assemble_analyses(run, analysis_units)
    _assemble_metrics(run, metric_units, memorized, analyses)
    return _combine("reduce", results)


def _memorized_prints(memorized: pd.DataFrame, steps: list[int]) -> dict[int, str]:
    """Per step, a hash of the set of samples memorized by then: the sets are prefixes of the
    samples ordered by (memorized since, id), so one pass hashes them all."""
    ordered = memorized.dropna(subset=["memorized_since"]).sort_values(["memorized_since", "sample_id"])
    since, ids = ordered["memorized_since"].to_numpy(), ordered["sample_id"].to_numpy()
    digest, position, out = hashlib.sha256(), 0, {}
    for step in sorted(set(steps)):
        while position < len(ids) and since[position] <= step:
            digest.update(f"{ids[position]}\n".encode())
            position += 1
        out[step] = digest.copy().hexdigest()
    return out


def _analysis_units(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef], recorded: dict) -> list[Unit]:
    names = [ref.name for ref in refs if any(name == ref.name for name, _ in recorded)]
    reference = cfg.metrics.saturation_reference or names[-1]
    units = []
    for ref in refs:
        if ref.name not in names:
            continue
        shards = [(index, recorded[ref.name, index]) for index in sorted(i for n, i in recorded if n == ref.name)]
        pairs = [(str(path), str(recorded[reference, index][1]) if (reference, index) in recorded else None)
                 for index, (_, path, _) in shards]
        prints = [(fp, recorded[reference, index][2] if (reference, index) in recorded else None)
                  for index, (_, _, fp) in shards]
        is_reference = ref.name == reference
        units.append(Unit(
            ref.name, ref.name, _parts(run) / "analyses" / f"{ref.name}.parquet",
            fingerprint(prints, is_reference, cfg.metrics.vocab_min_count),
            payload={"ref": ref, "shards": pairs, "is_reference": is_reference,
                     "coactivation": str(_parts(run) / "analyses" / f"{ref.name}.coactivation.parquet"),
                     "specialization": str(_parts(run) / "analyses" / f"{ref.name}.specialization.parquet")}))
    return units


def _read_done(units: list[Unit]) -> list[pd.DataFrame]:
    return [pd.read_parquet(unit.output) for unit in units if done_fingerprint(unit.output) == unit.fingerprint]


def _assemble_memorized(run: RunDir, units: list[Unit]) -> pd.DataFrame | None:
    """memorized.parquet from the per-group parts; None unless every group has its part."""
    frames = _read_done(units)
    if len(frames) < len(units):
        return None
    combined = fingerprint([unit.fingerprint for unit in units])
    if done_fingerprint(run.memorized) != combined:
        write_parquet(pd.concat(frames, ignore_index=True), run.memorized)
        mark_done(run.memorized, combined)
    return pd.read_parquet(run.memorized)


def _assemble_analyses(run: RunDir, units: list[Unit]) -> pd.DataFrame:
    """routing_analyses.parquet, coactivation.parquet and domain_specialization.parquet from the
    parts; returns the (checkpoint, group) layer means that go into metrics.parquet."""
    frames = _read_done(units)
    layers = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_parquet(layers, run.routing_analyses)
    reference = next((u for u in units if u.payload["is_reference"]), None)
    for key, path in (("coactivation", run.coactivation), ("specialization", run.domain_specialization)):
        part = Path(reference.payload[key]) if reference is not None else None
        write_parquet(pd.read_parquet(part) if part is not None and part.exists() else pd.DataFrame(), path)
    if layers.empty:
        return pd.DataFrame(columns=["checkpoint", "group", *ANALYSIS_COLUMNS.values()])
    means = layers[layers["group"] != "*"].groupby(["checkpoint", "group"])[list(ANALYSIS_COLUMNS)].mean()
    return means.rename(columns=ANALYSIS_COLUMNS).reset_index()


def _assemble_metrics(run: RunDir, units: list[Unit], memorized: pd.DataFrame,
                      analyses: pd.DataFrame | None) -> None:
    """metrics.parquet: the per-checkpoint parts, the count of memorized samples per row, and the
    routing analyses' layer means."""
    frames = _read_done(units)
    if not frames:
        raise RuntimeError(f"{run.root}: no checkpoint has metrics; see failures.parquet")
    metrics = pd.concat(frames, ignore_index=True)
    since = memorized.set_index("sample_id")["memorized_since"]
    counts = {(group, step): int((part <= step).sum()) for group, part in since.groupby(memorized["group"].values)
              for step in metrics["step"].unique()}
    metrics.insert(4, "num_memorized", [counts[g, s] for g, s in zip(metrics["group"], metrics["step"], strict=True)])
    if analyses is not None:
        metrics = metrics.merge(analyses, on=["checkpoint", "group"], how="left")
    write_parquet(metrics.sort_values(["step", "checkpoint", "group", "sample_set"], ignore_index=True), run.metrics)
