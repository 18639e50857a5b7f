"""The whole sweep: record -> reduce -> tune -> evaluate -> analyze -> report, one run dir."""

from __future__ import annotations

import errno
import time

import pandas as pd

from moegrok.config import Stage, SweepConfig
from moegrok.errors import UserError
from moegrok.pipeline.executor import StageResult
from moegrok.pipeline.preflight import Inputs, check_inputs
from moegrok.report.run import correlation_summary, verdicts
from moegrok.store import (
    RunDir,
    configure_storage,
    read_parquet,
    run_lock,
    write_parquet,
)

STAGE_ORDER = (Stage.record, Stage.reduce, Stage.tune, Stage.evaluate, Stage.analyze, Stage.report)


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
    configure_storage(cfg.storage.options)  # a URL run_dir and URL inputs; workers get them with each unit
    run = RunDir(cfg.run_dir)
    inputs = check_inputs(cfg, run, stages)  # before the first file of the run dir
    try:
        run.root.mkdir(parents=True, exist_ok=True)
        with run_lock(run.root, lease_ttl_s=cfg.storage.lease_ttl_s):
            inputs.save(cfg, run)
            return _run_stages(cfg, run, stages, inputs)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"run dir {run.root}: no space left on the device (writing "
                            f"{e.filename or 'a table'}); free some and re-run: finished units are kept") from e
        raise


def _run_stages(cfg: SweepConfig, run: RunDir, stages: list[Stage], inputs: Inputs) -> int:
    if not inputs.refs:
        print("no complete checkpoint yet")
        return 0
    results: list[StageResult] = []
    for stage in stages:
        if stage == Stage.analyze and not run.metrics.exists():
            print("analyze: skipped, no metrics.parquet (nothing was recorded)")
            continue
        start = time.perf_counter()
        result = STAGES[stage](cfg, run, inputs)
        result.seconds = time.perf_counter() - start
        # the record stage also reports malformed samples
        run.write_failures({stage, "samples"} if stage == Stage.record else {stage}, result.failures)
        results.append(result)
        _stop_if_disk_full(result)
    table = pd.DataFrame([result.summary() for result in results])
    print("\nmoegrok sweep summary (" + str(run.root) + ")\n" + table.to_string(index=False))
    write_parquet(table.assign(bytes_received=[result.bytes_received for result in results]), run.stages)
    if run.correlations.exists() and Stage.report in stages:
        correlations = read_parquet(run.correlations)
        if len(correlations) and correlations["spearman"].notna().any():
            print("\nSpearman with accuracy after memorization (* = beats step and loss baselines, detrended too)")
            print(correlation_summary(correlations).to_string(index=False))
            onsets = read_parquet(run.onsets) if run.onsets.exists() else None
            print("\n".join(verdicts(correlations, onsets)))
    if run.verdicts.exists() and Stage.report in stages:
        from moegrok.analysis.verdicts import verdict_lines

        lines = verdict_lines(read_parquet(run.verdicts))
        if lines:
            print("\nWhat the study's calibrated rules say (training side only):\n" + "\n".join(lines))
    if cfg.cluster.sync_uri:
        sync(run, cfg.cluster.sync_uri)
    return _say_what_failed(run, results)


def _say_what_failed(run: RunDir, results: list[StageResult]) -> int:
    """Failed units and bad records, counted apart, and each stage's first failure in one line;
    the exit status (1 when anything failed)."""
    units, records = sum(r.failed for r in results), sum(r.bad_records for r in results)
    if not units and not records:
        return 0
    print(f"\n{units} unit(s) failed, {records} bad record(s) left out; every one is in {run.failures}")
    for result in results:
        if result.failures:
            first, more = result.failures[0], len(result.failures) - 1
            print(f"  {result.stage}: {first['unit']}: {first['error_type']}: {first['message']}"
                  + (f" (and {more} more)" if more else ""))
    return 1


def _stop_if_disk_full(result: StageResult) -> None:
    """Workers report a full disk as unit failures; no later unit can succeed, so stop there."""
    full = next((f for f in result.failures if f"[Errno {errno.ENOSPC}]" in f["message"]), None)
    if full is not None:
        raise OSError(errno.ENOSPC, "No space left on device", f"the output of {result.stage} unit {full['unit']}")


def _record(cfg: SweepConfig, run: RunDir, inputs: Inputs) -> StageResult:
    from moegrok.pipeline.record import record_stage

    result = record_stage(cfg, run, inputs.refs, inputs.shards)
    result.failures = inputs.shards.failures + result.failures
    return result


def _reduce(cfg: SweepConfig, run: RunDir, inputs: Inputs) -> StageResult:
    from moegrok.pipeline.reduce import reduce_stage

    num_shards = int(read_parquet(run.samples, columns=["shard"])["shard"].max()) + 1
    return reduce_stage(cfg, run, inputs.refs, num_shards)


def _tune(cfg: SweepConfig, run: RunDir, inputs: Inputs) -> StageResult:
    from moegrok.pipeline.tune import tune_stage

    return tune_stage(cfg, run, inputs.refs)


def _evaluate(cfg: SweepConfig, run: RunDir, inputs: Inputs) -> StageResult:
    from moegrok.pipeline.evaluate import evaluate_stage

    refs = inputs.refs
    if cfg.tune.enabled:
        from moegrok.pipeline.tune import tuned_refs

        refs = refs + tuned_refs(run, refs)
    return evaluate_stage(cfg, run, refs, inputs.benchmarks)


def _analyze(cfg: SweepConfig, run: RunDir, inputs: Inputs) -> StageResult:
    from moegrok.pipeline.analyze import analyze_stage

    return analyze_stage(cfg, run)


def _report(cfg: SweepConfig, run: RunDir, inputs: Inputs) -> StageResult:
    from moegrok.pipeline.report import report_stage

    return report_stage(run)


STAGES = {Stage.record: _record, Stage.reduce: _reduce, Stage.tune: _tune, Stage.evaluate: _evaluate,
          Stage.analyze: _analyze, Stage.report: _report}


def sync(run: RunDir, uri: str) -> None:
    """Copy a local run directory to an fsspec URL (s3://, gs://, ...); a run dir that is a URL
    already is written there directly (config: sync_uri must then be null)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.put(str(run.root) + "/", path.rstrip("/") + "/", recursive=True)
