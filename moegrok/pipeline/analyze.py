"""Analyze stage: contrast.parquet and verdicts.parquet (the study's calibrated rules on this run)
from the training side alone and, with accuracy, correlations.parquet and onsets.parquet; one unit,
skipped when its outputs hold the current inputs."""

from __future__ import annotations

import dataclasses

from moegrok.analysis.contrast import run_contrasts
from moegrok.analysis.correlations import analyze
from moegrok.analysis.verdicts import calibrated_rules, run_verdicts
from moegrok.config import SweepConfig, config_yaml
from moegrok.metrics.memorization import causal_memorization
from moegrok.pipeline.executor import StageResult
from moegrok.store import RunDir, fingerprint, read_parquet, read_tags, write_parquet


def analyze_stage(cfg: SweepConfig, run: RunDir) -> StageResult:
    """contrast.parquet (training-side only) and, with accuracy, correlations.parquet and
    onsets.parquet; skipped when they hold the current inputs. The reduce's tables must come from
    one reduce (a kill mid-publish leaves them mixed)."""
    if not (run.metrics.exists() and run.memorized.exists()):
        raise RuntimeError(f"{run.root}: analyze needs metrics.parquet and memorized.parquet")
    reduce_tags = {read_tags(path).get("reduce") for path in (run.metrics, run.memorized)}
    if len(reduce_tags) > 1:
        raise RuntimeError(f"{run.root}: metrics.parquet and memorized.parquet come from different reduce runs "
                           "(one was interrupted while publishing): run stage=reduce again")
    tags = {"metrics": reduce_tags.pop(), "accuracy": read_tags(run.accuracy).get("evaluate"),
            "analysis": dataclasses.asdict(cfg.analysis), "config": config_yaml(cfg)}
    inputs = {key: tags[key] for key in ("metrics", "accuracy", "analysis")}
    outputs = [run.contrast, run.verdicts, *((run.correlations, run.onsets) if run.accuracy.exists() else ())]
    if all(read_tags(path).get("inputs") == fingerprint(inputs) for path in outputs):
        return StageResult("analyze", units=1, skipped=1)
    metrics, memorized = read_parquet(run.metrics), read_parquet(run.memorized)
    tags["inputs"] = fingerprint(inputs)
    starts = causal_memorization(metrics, memorized_accuracy=cfg.analysis.memorized_accuracy)
    contrast = run_contrasts(run, {group: step for group, (step, _) in starts.items()},
                             control=cfg.analysis.control, num_draws=cfg.analysis.num_draws)
    if len(contrast):  # how each group's start was found, for the report to say
        contrast["memorization_rule"] = contrast["group"].map({group: rule for group, (_, rule) in starts.items()})
    write_parquet(contrast, run.contrast, tags=tags)
    write_parquet(run_verdicts(contrast, calibrated_rules()), run.verdicts, tags=tags)
    if run.accuracy.exists():
        correlations, onsets = analyze(
            metrics, read_parquet(run.accuracy), memorized, sample_set=cfg.analysis.sample_set,
            group_map=dict(cfg.analysis.group_map), min_rise=cfg.analysis.min_rise,
            memorized_accuracy=cfg.analysis.memorized_accuracy, min_n=cfg.analysis.min_n,
        )
        write_parquet(correlations, run.correlations, tags=tags)
        write_parquet(onsets, run.onsets, tags=tags)
    return StageResult("analyze", units=1, done=1)
