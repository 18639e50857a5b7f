"""Reduce stage: routing tables -> per-sample pathway features, the memorized set, metrics.

Units, each computed and written by a Ray worker and skipped when current:
* features (checkpoint x shard): a routing shard -> sample_metrics/<ckpt>/shardNNNNN.parquet,
  one row per sample (pathways, consistency, loss), every positions variant side by side;
* memorized (data group): every checkpoint's losses of the group's samples -> its samples'
  memorized-since steps (the paper's loss rule needs all checkpoints), memorized.parquet;
* metrics (checkpoint x sample set): one checkpoint's features -> a row per group
  (parts/metrics/<ckpt>/<sample set>.parquet), the embedding measure (MED) beside;
* analyses (checkpoint): see analyses.py.
Routing is partitioned by checkpoint on disk, so a checkpoint's unit reads exactly its rows:
no shuffle. The driver only publishes the small per-checkpoint parts as metrics.parquet and
routing_analyses.parquet; it never holds routing or per-sample rows.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from moegrok.config import MemorizationConfig, SampleSet, SweepConfig, as_plain, config_yaml
from moegrok.data.checkpoints import CheckpointRef
from moegrok.metrics.embedding import main_embedding_diff, main_embedding_diff_cyclic
from moegrok.metrics.memorization import select_memorized
from moegrok.metrics.table import checkpoint_features, set_row
from moegrok.pipeline.cluster import init_ray
from moegrok.pipeline.executor import StageResult, TaskPool, Unit, run_stage
from moegrok.pipeline.reduce_analyses import analysis_units, assemble_analyses, computes
from moegrok.store import (
    RunDir,
    done_fingerprint,
    failure_row,
    fingerprint,
    load_safetensors,
    read_parquet,
    read_table,
    read_tags,
    write_parquet,
)


@functools.lru_cache(maxsize=8)
def _checkpoint_weights(path: str) -> dict[str, np.ndarray]:
    return load_safetensors(path)


# --------------------------------------------------------------------------- units (on Ray workers)


def compute_features(unit: Unit, *, weight_share: float, positions: list[str]) -> dict:
    routers_LED = _checkpoint_weights(unit.payload["weights"])["routers"]
    features = checkpoint_features(read_table(unit.payload["routing"]), routers_LED, weight_share=weight_share,
                                   positions=positions)
    write_parquet(features, unit.output)
    return {"rows": len(features)}


def compute_metrics(unit: Unit, *, positions: list[str], max_pairs: int, seed: int) -> dict:
    """A row per group for one checkpoint and sample set; samples in sample_id order, columns
    Arrow-backed (means by Arrow's kernels)."""
    features = read_table(unit.payload["features"]).to_pandas(types_mapper=pd.ArrowDtype)
    features = features.sort_values("sample_id", ignore_index=True)
    ref: CheckpointRef = unit.payload["ref"]
    if unit.payload["sample_set"] == SampleSet.memorized:
        memorized = read_table(unit.payload["memorized"], columns=["sample_id", "memorized_since"]).to_pandas()
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
    residues = weights.get("residue_embeddings")
    frame["med"] = np.nan if residues is None else main_embedding_diff(residues)
    frame["med_cyclic"] = np.nan if residues is None else main_embedding_diff_cyclic(residues)
    write_parquet(frame, unit.output)
    return {"rows": len(frame)}


def compute_memorized(unit: Unit, *, memo: MemorizationConfig) -> dict:
    """The loss rule's memorized set of one data group, from every checkpoint's features."""
    losses = read_table(unit.payload["features"], columns=["step", "sample_id", "group", "loss"],
                           filters=[("group", "=", unit.payload["group"])]).to_pandas()
    memorized = select_memorized(losses, delta=memo.delta, eps=memo.eps, target_fraction=memo.target_fraction)
    write_parquet(memorized, unit.output)
    return {"rows": len(memorized)}


# --------------------------------------------------------------------------- the stage (driver)


def features_path(run: RunDir, checkpoint: str, shard: int) -> Path:
    return run.sample_metrics / checkpoint / f"shard{shard:05d}.parquet"


def _tasks(cfg: SweepConfig):
    """Executor factory: the compute function on Ray tasks, one CPU each (Ray starts on first use)."""
    def executor(compute):
        def make(todo: list[Unit]) -> TaskPool:
            init_ray(cfg.cluster)
            return TaskPool(compute, options={"num_cpus": 1}, max_in_flight=int(ray.cluster_resources()["CPU"]),
                            max_retries=cfg.record.max_retries)
        return make
    return executor


def _combine(stage: str, results: list[StageResult]) -> StageResult:
    """One result for the stage; a failure names its part ("features step0/shard00001")."""
    combined = StageResult(stage)
    for result in results:
        combined.units += result.units
        combined.skipped += result.skipped
        combined.done += result.done
        combined.bytes_received += result.bytes_received
        part = result.stage.removeprefix(f"{stage} ")
        combined.failures += [{**row, "stage": stage, "unit": f"{part} {row['unit']}"} for row in result.failures]
    return combined


def _recorded(run: RunDir, refs: list[CheckpointRef], num_shards: int) -> dict[tuple[str, int], tuple[Path, str]]:
    """(checkpoint, shard) -> (routing file, its fingerprint), of the recorded units only."""
    recorded = {}
    for ref in refs:
        for index in range(num_shards):
            path = run.routing_shard(ref.name, index)
            if (print_ := done_fingerprint(path)) is not None:
                recorded[ref.name, index] = (path, print_)
    return recorded


def feature_units(cfg: SweepConfig, run: RunDir, recorded: dict) -> list[Unit]:
    """One unit per recorded routing shard: its per-sample pathway features."""
    positions = [str(p) for p in cfg.metrics.positions]
    return [Unit(f"{name}/shard{index:05d}", name, features_path(run, name, index),
                 {"routing": routing_print, "metrics.weight_share": cfg.metrics.weight_share,
                  "metrics.positions": positions},
                 payload={"routing": str(path), "weights": str(run.checkpoint_weights(name))})
            for (name, index), (path, routing_print) in recorded.items()]


def complete_features(units: list[Unit]) -> dict[str, list[Unit]]:
    """checkpoint -> its feature units, for the checkpoints whose every recorded shard has them."""
    features: dict[str, list[Unit]] = {}
    for unit in units:
        features.setdefault(unit.checkpoint, []).append(unit)
    return {name: units for name, units in features.items()
            if all(done_fingerprint(u.output) == u.fingerprint for u in units)}


def memorized_units(cfg: SweepConfig, parts: Path, groups: list[str], features: dict[str, list[Unit]]) -> list[Unit]:
    """One unit per data group, over every checkpoint's features (the loss rule needs them all);
    none unless the memorized sample set is asked for."""
    if SampleSet.memorized not in cfg.metrics.sample_sets:
        return []
    every_feature = [u for units in features.values() for u in units]
    return [Unit(f"memorized/{group}", "*", parts / "memorized" / f"group{index:04d}.parquet",
                 {"features": sorted(u.fingerprint for u in every_feature), "group": group,
                  "metrics.memorization": as_plain(cfg.metrics.memorization)},
                 payload={"group": group, "features": [str(u.output) for u in every_feature]})
            for index, group in enumerate(groups)]


def metric_units(cfg: SweepConfig, run: RunDir, parts: Path, refs: list[CheckpointRef], groups: list[str],
                 features: dict[str, list[Unit]], memorized: list[Unit], memorized_prints: dict[int, str] | None
                 ) -> list[Unit]:
    """One unit per checkpoint x sample set (the memorized set only when `memorized_prints`)."""
    metrics = cfg.metrics
    settings = {"metrics.positions": [str(p) for p in metrics.positions], "metrics.max_pairs": metrics.max_pairs,
                "metrics.seed": metrics.seed, "groups": groups}
    sample_sets = [SampleSet.all] if memorized_prints is None else [SampleSet.all, SampleSet.memorized]
    return [Unit(f"{ref.name}/{sample_set}", ref.name, parts / "metrics" / ref.name / f"{sample_set}.parquet",
                 {"features": [u.fingerprint for u in features[ref.name]], "sample set": str(sample_set),
                  "memorized set": memorized_prints[ref.step] if sample_set == SampleSet.memorized else None,
                  **settings},
                 payload={"ref": ref, "sample_set": sample_set, "features": [str(u.output) for u in features[ref.name]],
                          "memorized": [str(u.output) for u in memorized], "groups": groups,
                          "weights": str(run.checkpoint_weights(ref.name))})
            for ref in refs if ref.name in features for sample_set in sample_sets]


def reduce_stage(cfg: SweepConfig, run: RunDir, refs: list[CheckpointRef], num_shards: int) -> StageResult:
    """Features per routing shard, the memorized set per group, metrics per checkpoint x sample
    set, the routing analyses per checkpoint; then the published tables."""
    metrics_cfg = cfg.metrics
    positions = [str(p) for p in metrics_cfg.positions]
    parts = run.root / "parts"
    recorded = _recorded(run, refs, num_shards)
    if not recorded:
        return StageResult("reduce", failures=[failure_row(
            "reduce", "*", "NothingToReduce", f"no recorded routing in {run.root / 'routing'}: the record stage "
            "has not run, or every unit of it failed (see its failure rows)")])
    tasks = _tasks(cfg)

    features_todo = feature_units(cfg, run, recorded)
    results = [run_stage("reduce features", features_todo, tasks(functools.partial(
        compute_features, weight_share=metrics_cfg.weight_share, positions=positions)), progress=cfg.progress)]
    features = complete_features(features_todo)

    groups = sorted(set(read_parquet(run.samples, columns=["group"])["group"]))
    memorized_todo = memorized_units(cfg, parts, groups, features)
    results.append(run_stage("reduce memorized", memorized_todo,
                             tasks(functools.partial(compute_memorized, memo=metrics_cfg.memorization)),
                             progress=False))
    memorized = _finished(memorized_todo)
    if memorized_todo and len(memorized) == len(memorized_todo):
        memorized = pd.concat(memorized, ignore_index=True)
        memorized_prints = _memorized_prints(memorized, [ref.step for ref in refs])
    else:  # not asked for, or a group's unit failed: metrics of all samples only
        memorized = pd.DataFrame({"sample_id": [], "group": [], "eps": [], "memorized_since": []})
        memorized_prints = None

    metrics_todo = metric_units(cfg, run, parts, refs, groups, features, memorized_todo, memorized_prints)
    results.append(run_stage("reduce metrics", metrics_todo, tasks(functools.partial(
        compute_metrics, positions=positions, max_pairs=metrics_cfg.max_pairs, seed=metrics_cfg.seed)),
        progress=cfg.progress))
    analyses_todo: dict[str, list[Unit]] = {"analyses": [], "saturation": [], "reference": []}
    if metrics_cfg.routing_analyses.enabled:
        analyses_todo = analysis_units(cfg, run, refs, recorded, parts)
        for kind, compute in computes(cfg.metrics.routing_analyses).items():
            results.append(run_stage(f"reduce {kind}", analyses_todo[kind], tasks(compute), progress=cfg.progress))
    result = _combine("reduce", results)
    if not _publish(run, cfg, memorized, metrics_todo, analyses_todo, memorized_todo):
        result.failures.append(failure_row("reduce", "*", "NothingToReduce",
                                           "no checkpoint has metrics: every reduce unit of them failed"))
    return result


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


def _finished(units: list[Unit]) -> list[pd.DataFrame]:
    return [read_parquet(unit.output) for unit in units if done_fingerprint(unit.output) == unit.fingerprint]


def _publish(run: RunDir, cfg: SweepConfig, memorized: pd.DataFrame, metric_units: list[Unit],
             analysis_units: dict[str, list[Unit]], memorized_units: list[Unit]) -> bool:
    """Write the reduce's tables from the finished parts, every one tagged with the same
    fingerprint of the parts (analyze refuses to mix tables of two reduces); skipped when the
    tables already hold these parts. False when no checkpoint has metrics."""
    every = [*memorized_units, *metric_units, *(u for units in analysis_units.values() for u in units)]
    done = [u.fingerprint for u in every if done_fingerprint(u.output) == u.fingerprint]
    tags = {"reduce": fingerprint(sorted(done)), "config": config_yaml(cfg)}
    paths = [run.metrics, run.memorized, run.routing_analyses, run.coactivation, run.domain_specialization]
    if all(read_tags(path).get("reduce") == tags["reduce"] for path in paths):
        return True
    frames = _finished(metric_units)
    if not frames:
        return False
    metrics = pd.concat(frames, ignore_index=True)
    since = memorized.set_index("sample_id")["memorized_since"]
    counts = {(group, step): int((part <= step).sum()) for group, part in since.groupby(memorized["group"].values)
              for step in metrics["step"].unique()}
    metrics.insert(4, "num_memorized", [counts.get((g, s), 0)
                                        for g, s in zip(metrics["group"], metrics["step"], strict=True)])
    tables = assemble_analyses(analysis_units, _finished)
    if analysis_units["analyses"]:
        metrics = metrics.merge(tables["means"], on=["checkpoint", "group"], how="left")
    write_parquet(metrics.sort_values(["step", "checkpoint", "group", "sample_set"], ignore_index=True), run.metrics,
                  tags=tags)
    write_parquet(memorized, run.memorized, tags=tags)
    for key, path in (("routing_analyses", run.routing_analyses), ("coactivation", run.coactivation),
                      ("specialization", run.domain_specialization)):
        write_parquet(tables[key], path, tags=tags)
    return True
