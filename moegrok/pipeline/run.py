"""The whole sweep: record -> reduce -> tune -> evaluate -> analyze -> report, one run dir."""

from __future__ import annotations

import time

import pandas as pd
from omegaconf import OmegaConf

from moegrok.analysis import analyze
from moegrok.checkpoints import (
    CheckpointError,
    CheckpointRef,
    build_catalog,
    catalog_frame,
    local_path,
    refs_from_frame,
)
from moegrok.config import MonitorConfig, Stage, TuneMethod
from moegrok.pipeline.cluster import init_ray
from moegrok.pipeline.runner import StageResult
from moegrok.report import correlation_summary, verdicts, write_report
from moegrok.samples import SampleError, select_samples, shard_samples, tokenize_samples
from moegrok.store import RunDir, failure_row, write_parquet

STAGE_ORDER = (Stage.record, Stage.reduce, Stage.tune, Stage.evaluate, Stage.analyze, Stage.report)
RAY_STAGES = {Stage.record, Stage.reduce, Stage.tune, Stage.evaluate}


def prepare_samples(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef]) -> tuple[list, list[dict]]:
    """Select and tokenize the samples (tokenizer of the first loadable checkpoint) and shard them."""
    from transformers import AutoTokenizer

    errors: list[str] = []
    frame = select_samples(cfg.samples, errors=errors)
    failures = [failure_row("samples", e.split(": ", 1)[0], SampleError.__name__, e) for e in errors]
    tokenizer, problems = None, []
    for ref in refs:
        try:
            tokenizer = AutoTokenizer.from_pretrained(local_path(ref, cache_dir=cfg.checkpoints.cache_dir),
                                                      trust_remote_code=cfg.model.trust_remote_code)
            break
        except Exception as e:
            problems.append(f"{ref.name}: {type(e).__name__}: {e}")
    if tokenizer is None:
        raise CheckpointError("no checkpoint has a loadable tokenizer: " + "; ".join(problems))
    shards = [tokenize_samples(part, tokenizer, max_tokens=cfg.samples.max_tokens)
              for part in shard_samples(frame, shard_size=cfg.samples.shard_size)]
    table = pd.DataFrame([{"sample_id": s.sample_id, "group": s.group, "num_tokens": len(s.input_ids),
                           "num_prompt_tokens": s.num_prompt_tokens, "shard": index}
                          for index, shard in enumerate(shards) for s in shard])
    write_parquet(table, run.samples)
    return shards, failures


def _catalog(cfg: MonitorConfig, run: RunDir, stages: list[Stage]) -> list[CheckpointRef]:
    if {Stage.record, Stage.tune, Stage.evaluate} & set(stages) or not run.catalog.exists():
        refs = build_catalog(cfg.checkpoints)
        write_parquet(catalog_frame(refs), run.catalog)
        return refs
    return refs_from_frame(pd.read_parquet(run.catalog))


def run_monitor(cfg: MonitorConfig, stages: list[Stage] | None = None) -> int:
    """Run the configured stage(s) (`stages` overrides cfg.stage); returns the exit status
    (1 when anything failed)."""
    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    run.config.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    if stages is None:
        stages = list(STAGE_ORDER) if cfg.stage == Stage.all else [cfg.stage]
    if not cfg.eval.enabled or not cfg.eval.benchmarks:
        stages = [s for s in stages if s != Stage.evaluate]
    if cfg.tune.method == TuneMethod.none:
        stages = [s for s in stages if s != Stage.tune]
    refs = _catalog(cfg, run, stages)
    if RAY_STAGES & set(stages):
        init_ray(cfg.cluster)
    results: list[StageResult] = []
    for stage in stages:
        if stage == Stage.analyze and not run.accuracy.exists():
            print("analyze: skipped, no accuracy.parquet (evaluation is off and none is stored)")
            continue
        start = time.perf_counter()
        result = STAGES[stage](cfg, run, refs)
        result.seconds = time.perf_counter() - start
        # the record stage also reports malformed samples
        run.write_failures({stage, "samples"} if stage == Stage.record else {stage}, result.failures)
        results.append(result)
    table = pd.DataFrame([result.summary() for result in results])
    print("\nmoegrok sweep summary (" + str(run.root) + ")\n" + table.to_string(index=False))
    if run.correlations.exists() and Stage.report in stages:
        correlations = pd.read_parquet(run.correlations)
        if correlations["spearman"].notna().any():
            print("\nSpearman with accuracy after memorization (* = beats step and loss baselines, detrended too)")
            print(correlation_summary(correlations).to_string(index=False))
            onsets = pd.read_parquet(run.onsets) if run.onsets.exists() else None
            print("\n".join(verdicts(correlations, onsets)))
    if cfg.cluster.sync_uri:
        sync(run, cfg.cluster.sync_uri)
    failed = sum(result.failed for result in results)
    if failed:
        print(f"\n{failed} unit(s) failed; see {run.failures}")
    return 1 if failed else 0


def _record(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    from moegrok.pipeline.record import record_stage

    shards, sample_failures = prepare_samples(cfg, run, refs)
    result = record_stage(cfg, run, refs, shards)
    result.failures = sample_failures + result.failures
    return result


def _reduce(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    from moegrok.pipeline.reduce import reduce_stage

    num_shards = int(pd.read_parquet(run.samples, columns=["shard"])["shard"].max()) + 1
    return reduce_stage(cfg, run, refs, num_shards)


def _tune(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    from moegrok.pipeline.tune import tune_stage

    return tune_stage(cfg, run, refs)


def _evaluate(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    from moegrok.pipeline.evaluate import evaluate_stage
    from moegrok.pipeline.tune import tuned_refs

    return evaluate_stage(cfg, run, refs + (tuned_refs(run, refs) if cfg.tune.method != TuneMethod.none else []))


def _analyze(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    if not (run.metrics.exists() and run.accuracy.exists() and run.memorized.exists()):
        raise RuntimeError(f"{run.root}: analyze needs metrics.parquet, accuracy.parquet and memorized.parquet")
    correlations, onsets = analyze(
        pd.read_parquet(run.metrics), pd.read_parquet(run.accuracy), pd.read_parquet(run.memorized),
        sample_set=cfg.analysis.sample_set, group_map=dict(cfg.analysis.group_map), min_rise=cfg.analysis.min_rise,
        memorized_accuracy=cfg.analysis.memorized_accuracy,
    )
    write_parquet(correlations, run.correlations)
    write_parquet(onsets, run.onsets)
    return StageResult("analyze", units=len(onsets), done=len(onsets))


def _report(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    write_report(run.root)
    return StageResult("report", units=1, done=1)


STAGES = {Stage.record: _record, Stage.reduce: _reduce, Stage.tune: _tune, Stage.evaluate: _evaluate,
          Stage.analyze: _analyze, Stage.report: _report}


def sync(run: RunDir, uri: str) -> None:
    """Copy the run directory to an fsspec URL (s3://, gs://, ...)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.put(str(run.root) + "/", path.rstrip("/") + "/", recursive=True)
