"""The science study: toy zoos trained and swept end to end, then, across zoos, the between-group
contrast and the detector calibrated on some zoos and evaluated on the others (detection.py).

Per zoo the sweep records routing once (metrics.positions = [all, answer]) and its analyze stage
writes the contrast; correlation rows at other pathway weight shares are recomputed in-process from
the stored routing tables (`local_metrics`). Resumable: a trained zoo and a finished sweep unit
are skipped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import yaml
from omegaconf import OmegaConf
from safetensors.numpy import load_file

from moegrok.analysis.correlations import analyze
from moegrok.config import (
    MetricsConfig,
    PretrainToyConfig,
    StudyConfig,
    StudyZooConfig,
    SweepConfig,
    compose_config,
)
from moegrok.metrics.table import checkpoint_features, group_rows
from moegrok.store import RunDir, write_parquet

STUDY_COLUMNS = ["zoo", "setting", "seed", "role", "weight_share", "group", "metric", "retrospective", "direction",
                 "n", "spearman", "pearson", "partial_spearman", "partial_q", "diff_spearman", "step_spearman",
                 "loss_spearman", "beats_baselines", "generalizing"]


def zoo_key(name: str, seed: int) -> str:
    return f"{name}-s{seed}"


def pretrain_config(cfg: StudyConfig, overrides: dict, seed: int, out_dir: Path) -> PretrainToyConfig:
    """The base config with dotted-key overrides (a list such as data.groups replaces the base's)."""
    nested: dict = {}
    for key, value in {**overrides, "train.seed": seed, "data.seed": seed, "out_dir": str(out_dir)}.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg.base), nested))


def sweep_config(cfg: StudyConfig, zoo: Path, run_dir: Path, p: int) -> SweepConfig:
    """The toy sweep (conf/experiment/toy.yaml) of one zoo at the study's sizes."""
    return compose_config("sweep", [
        "experiment=toy", f"run_dir={run_dir}", "progress=false", f"checkpoints.dir={zoo}",
        f"model.residue_tokens={p}", f"samples.max_per_group={cfg.samples_per_group}",
        f"samples.shard_size={cfg.samples_per_group}", f"eval.engine={cfg.eval_engine}",
        f"eval.max_items={cfg.eval_items}", "metrics.routing_analyses.enabled=false",
        f"analysis.control={cfg.control if cfg.control else 'null'}", f"analysis.num_draws={cfg.num_draws}",
    ])


def local_metrics(run: RunDir, *, weight_share: float, positions: list[str], max_pairs: int) -> pd.DataFrame:
    """metrics.parquet recomputed in-process from the stored routing tables at another weight share."""
    memorized = pd.read_parquet(run.memorized)
    since = dict(zip(memorized["sample_id"], memorized["memorized_since"], strict=True))
    frames = []
    for directory in sorted((run.root / "routing").iterdir()):
        shards = sorted(directory.glob("shard*.parquet"))
        if not shards or not (directory / "weights.safetensors").exists():
            continue
        routers = load_file(directory / "weights.safetensors")["routers"]
        table = pq.ParquetDataset(shards).read()
        features = checkpoint_features(table, routers, weight_share=weight_share, positions=positions)
        frames += [group_rows(members, memorized=since, positions=positions, max_pairs=max_pairs, seed=0)
                   for _, members in features.groupby("group", sort=True)]
    metrics = pd.concat(frames, ignore_index=True)
    med = pd.read_parquet(run.metrics, columns=["checkpoint", "med"]).drop_duplicates("checkpoint")
    return metrics.merge(med, on="checkpoint", how="left")  # the embedding measure has no weight share


def correlation_rows(cfg: StudyConfig, run: RunDir, key: dict) -> pd.DataFrame:
    """The per-group correlation rows after memorization (flagged and corrected, analysis.py) of one
    zoo at every configured pathway weight share, on all samples."""
    accuracy, memorized = pd.read_parquet(run.accuracy), pd.read_parquet(run.memorized)
    rows = []
    for weight_share in cfg.weight_shares:
        if weight_share == MetricsConfig.weight_share:
            metrics = pd.read_parquet(run.metrics)
        else:
            metrics = local_metrics(run, weight_share=weight_share, positions=["all", "answer"], max_pairs=2_000_000)
        correlations, _ = analyze(metrics, accuracy, memorized, sample_set="all")
        window = correlations[correlations["window"] == "post_memorization"]
        rows += [{**key, "weight_share": weight_share, **{k: row[k] for k in STUDY_COLUMNS[5:]}}
                 for row in window.to_dict("records")]
    return pd.DataFrame(rows, columns=STUDY_COLUMNS)


def _add_times(path: Path, **seconds: float) -> dict:
    """Wall seconds spent on a zoo, summed over every invocation that resumed it (times/<zoo>.json)."""
    spent = json.loads(path.read_text()) if path.exists() else {}
    spent = {key: spent.get(key, 0.0) + seconds.get(key, 0.0) for key in {*spent, *seconds}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spent))
    return spent


def train_and_sweep(cfg: StudyConfig, zoo_cfg: StudyZooConfig, seed: int) -> dict:
    """One zoo, trained (or resumed; a `dir` zoo is only swept) and swept; returns its key and the
    wall seconds spent on it over all invocations."""
    from moegrok.pipeline import run_sweep
    from moegrok.toy.train import train_toy

    key = zoo_key(zoo_cfg.name, seed)
    start = time.perf_counter()
    if zoo_cfg.dir is None:
        zoo = Path(cfg.zoo_dir) / key
        pretrain = pretrain_config(cfg, dict(zoo_cfg.overrides), seed, zoo)
        print(f"study: {key} -> training {zoo}", flush=True)
        train_toy(pretrain, progress=cfg.progress)
        p = pretrain.data.p
    else:
        zoo = Path(zoo_cfg.dir)
        p = int(yaml.safe_load((zoo / "zoo.yaml").read_text())["data"]["p"])
    trained = time.perf_counter()
    run = RunDir(Path(cfg.out_dir) / key)
    if run_sweep(sweep_config(cfg, zoo, run.root, p)):
        print(f"study: {key}: the sweep reported failures (see {run.failures})")
    spent = _add_times(Path(cfg.out_dir) / "times" / f"{key}.json", train_s=trained - start,
                       sweep_s=time.perf_counter() - trained)
    return {"zoo": key, "zoo_dir": str(zoo), **spent}


def run_study(cfg: StudyConfig) -> dict[str, pd.DataFrame]:
    """Train and sweep every zoo (resumable), then the cross-zoo tables (detection.py) and
    study.html; returns the tables by name."""
    from moegrok.report.study import write_study_report
    from moegrok.study.detection import study_tables

    for zoo in cfg.zoos:  # a typo in an override fails now, not an hour into the study
        pretrain_config(cfg, dict(zoo.overrides), 0, Path(cfg.zoo_dir))
    out = Path(cfg.out_dir)
    zoos, correlations = [], []
    for zoo in [*cfg.zoos, *cfg.extra_zoos]:
        for seed in zoo.seeds:
            times = train_and_sweep(cfg, zoo, seed)
            key = {"zoo": times["zoo"], "setting": zoo.name, "seed": seed, "role": str(zoo.role)}
            settings = " ".join(f"{k}={v}" for k, v in zoo.overrides.items()) or "(default)"
            zoos.append({**key, "overrides": settings if zoo.dir is None else f"trained elsewhere: {zoo.dir}",
                         "zoo_dir": times["zoo_dir"], "train_s": times["train_s"], "sweep_s": times["sweep_s"]})
            correlations.append(correlation_rows(cfg, RunDir(out / times["zoo"]), key))
    tables = study_tables(cfg, pd.DataFrame(zoos))
    tables["study"] = pd.concat(correlations, ignore_index=True)
    for name, frame in tables.items():
        write_parquet(frame, out / f"{name}.parquet")
    write_study_report(tables, out, cfg=cfg)
    if cfg.findings_dir:
        from moegrok.study.findings import render_into, write_findings

        directory = Path(cfg.findings_dir)
        write_findings(tables, directory)
        markdown = directory.with_suffix(".md")
        if markdown.exists():
            render_into(markdown, directory)
    return tables
