"""The whole sweep: record -> reduce -> tune -> evaluate -> analyze -> report, one run dir."""

from __future__ import annotations

import dataclasses
import errno
import time
from pathlib import Path

import pandas as pd

from moegrok.config import Stage, SweepConfig, config_yaml
from moegrok.data.checkpoints import (
    CheckpointRef,
    build_catalog,
    catalog_frame,
    content_key,
    incomplete,
    refs_from_frame,
)
from moegrok.errors import CheckpointError, SampleError, UserError
from moegrok.pipeline.executor import StageResult
from moegrok.report.run import correlation_summary, verdicts
from moegrok.store import (
    RunDir,
    run_lock,
    write_parquet,
    write_text,
)

STAGE_ORDER = (Stage.record, Stage.reduce, Stage.tune, Stage.evaluate, Stage.analyze, Stage.report)


def check_inputs(cfg: SweepConfig, stages: list[Stage]) -> None:
    """Before any work: every input file the stages read exists and is not empty."""
    def need(path: str, key: str) -> None:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"{key}={path!r}: no such file")
        if file.stat().st_size == 0:
            raise UserError(f"{key}={path!r}: the file is empty")

    if Stage.record in stages:
        if not cfg.samples.paths:
            raise SampleError("samples.paths is empty: give at least one jsonl/parquet sample file")
        for index, path in enumerate(cfg.samples.paths):
            need(path, f"samples.paths[{index}]")
        if cfg.checkpoints.dir and not Path(cfg.checkpoints.dir).is_dir():
            raise CheckpointError(f"checkpoints.dir={cfg.checkpoints.dir!r} is not a directory")
    if Stage.evaluate in stages:
        for bench in cfg.eval.benchmarks:
            need(bench.path, f"eval.benchmarks[{bench.name}].path")
    if Stage.tune in stages and cfg.tune.data:
        need(cfg.tune.data, "tune.data")


def _catalog(cfg: SweepConfig, run: RunDir, stages: list[Stage]) -> list[CheckpointRef]:
    """The checkpoints, each with a key of its current content (so replaced weights re-run). While
    watching, a checkpoint still being written is left for the next round."""
    if not ({Stage.record, Stage.tune, Stage.evaluate} & set(stages) or not run.catalog.exists()):
        return refs_from_frame(pd.read_parquet(run.catalog))
    try:
        refs = build_catalog(cfg.checkpoints)
    except CheckpointError:
        if cfg.watch.enabled and cfg.checkpoints.dir and Path(cfg.checkpoints.dir).is_dir():
            return []  # no checkpoint written yet
        raise
    if cfg.watch.enabled:
        waiting = {ref.name: reason for ref in refs if (reason := incomplete(ref))}
        if waiting:
            print(f"waiting for {len(waiting)} checkpoint(s) still being written: {', '.join(waiting)}")
        refs = [ref for ref in refs if ref.name not in waiting]
    refs = [dataclasses.replace(ref, content=content_key(ref)) for ref in refs]
    write_parquet(catalog_frame(refs), run.catalog)
    return refs


def run_sweep(cfg: SweepConfig, stages: list[Stage] | None = None) -> int:
    """Run the configured stage(s) (`stages` overrides cfg.stage); returns the exit status
    (1 when anything failed). Raises UserError for inputs no retry can fix, before any work."""
    if stages is None:
        stages = list(STAGE_ORDER) if cfg.stage == Stage.all else [cfg.stage]
    stages = [stage for stage in STAGE_ORDER if stage in stages]  # in pipeline order, whatever the caller's
    if not cfg.eval.enabled or not cfg.eval.benchmarks:
        stages = [s for s in stages if s != Stage.evaluate]
    if not cfg.tune.enabled:
        stages = [s for s in stages if s != Stage.tune]
    check_inputs(cfg, stages)
    run = RunDir(cfg.run_dir)
    try:
        run.root.mkdir(parents=True, exist_ok=True)
        with run_lock(run.root):
            return _run_stages(cfg, run, stages)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"run dir {run.root}: no space left on the device (writing "
                            f"{e.filename or 'a table'}); free some and re-run: finished units are kept") from e
        raise


def _run_stages(cfg: SweepConfig, run: RunDir, stages: list[Stage]) -> int:
    refs = _catalog(cfg, run, stages)
    write_text(config_yaml(cfg), run.config)
    if not refs:
        print("no complete checkpoint yet")
        return 0
    results: list[StageResult] = []
    for stage in stages:
        if stage == Stage.analyze and not run.metrics.exists():
            print("analyze: skipped, no metrics.parquet (nothing was recorded)")
            continue
        start = time.perf_counter()
        result = STAGES[stage](cfg, run, refs)
        result.seconds = time.perf_counter() - start
        # the record stage also reports malformed samples
        run.write_failures({stage, "samples"} if stage == Stage.record else {stage}, result.failures)
        results.append(result)
        _stop_if_disk_full(result)
    table = pd.DataFrame([result.summary() for result in results])
    print("\nmoegrok sweep summary (" + str(run.root) + ")\n" + table.to_string(index=False))
    write_parquet(table.assign(bytes_received=[result.bytes_received for result in results]), run.stages)
    if run.correlations.exists() and Stage.report in stages:
        correlations = pd.read_parquet(run.correlations)
        if len(correlations) and correlations["spearman"].notna().any():
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


def _stop_if_disk_full(result: StageResult) -> None:
    """Workers report a full disk as unit failures; no later unit can succeed, so stop there."""
    full = next((f for f in result.failures if f"[Errno {errno.ENOSPC}]" in f["message"]), None)
    if full is not None:
        raise OSError(errno.ENOSPC, "No space left on device", f"the output of {result.stage} unit {full['unit']}")


def _record(cfg: SweepConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    from moegrok.pipeline.record import record_stage
    from moegrok.pipeline.shards import prepare_shards

    shards = prepare_shards(cfg, run, refs)
    result = record_stage(cfg, run, refs, shards)
    result.failures = shards.failures + result.failures
    return result


def _reduce(cfg: SweepConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    from moegrok.pipeline.reduce import reduce_stage

    num_shards = int(pd.read_parquet(run.samples, columns=["shard"])["shard"].max()) + 1
    return reduce_stage(cfg, run, refs, num_shards)


def _tune(cfg: SweepConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    from moegrok.pipeline.tune import tune_stage

    return tune_stage(cfg, run, refs)


def _evaluate(cfg: SweepConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    from moegrok.pipeline.evaluate import evaluate_stage

    if cfg.tune.enabled:
        from moegrok.pipeline.tune import tuned_refs

        refs = refs + tuned_refs(run, refs)
    return evaluate_stage(cfg, run, refs)


def _analyze(cfg: SweepConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    from moegrok.pipeline.analyze import analyze_stage

    return analyze_stage(cfg, run)


def _report(cfg: SweepConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    from moegrok.pipeline.report import report_stage

    return report_stage(run)


STAGES = {Stage.record: _record, Stage.reduce: _reduce, Stage.tune: _tune, Stage.evaluate: _evaluate,
          Stage.analyze: _analyze, Stage.report: _report}


def sync(run: RunDir, uri: str) -> None:
    """Copy the run directory to an fsspec URL (s3://, gs://, ...)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.put(str(run.root) + "/", path.rstrip("/") + "/", recursive=True)
