"""The whole sweep: record -> reduce -> tune -> evaluate -> analyze -> report, one run dir."""

from __future__ import annotations

import dataclasses
import errno
import time
from pathlib import Path

import pandas as pd

from moegrok.analysis import analyze
from moegrok.checkpoints import (
    CheckpointError,
    CheckpointRef,
    build_catalog,
    catalog_frame,
    content_key,
    incomplete,
    refs_from_frame,
)
from moegrok.config import MonitorConfig, Stage, TuneMethod, config_yaml
from moegrok.contrast_table import causal_memorization, run_contrasts
from moegrok.errors import UserError
from moegrok.pipeline.runner import StageResult
from moegrok.report import REPORT_VERSION, correlation_summary, verdicts, write_report
from moegrok.samples import SampleError
from moegrok.store import (
    RunDir,
    fingerprint,
    is_done,
    mark_done,
    read_tags,
    run_lock,
    write_parquet,
    write_text,
)

STAGE_ORDER = (Stage.record, Stage.reduce, Stage.tune, Stage.evaluate, Stage.analyze, Stage.report)


def check_inputs(cfg: MonitorConfig, stages: list[Stage]) -> None:
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


def _catalog(cfg: MonitorConfig, run: RunDir, stages: list[Stage]) -> list[CheckpointRef]:
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


def run_monitor(cfg: MonitorConfig, stages: list[Stage] | None = None) -> int:
    """Run the configured stage(s) (`stages` overrides cfg.stage); returns the exit status
    (1 when anything failed). Raises UserError for inputs no retry can fix, before any work."""
    if stages is None:
        stages = list(STAGE_ORDER) if cfg.stage == Stage.all else [cfg.stage]
    if not cfg.eval.enabled or not cfg.eval.benchmarks:
        stages = [s for s in stages if s != Stage.evaluate]
    if cfg.tune.method == TuneMethod.none:
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


def _run_stages(cfg: MonitorConfig, run: RunDir, stages: list[Stage]) -> int:
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


def watch(cfg: MonitorConfig) -> int:
    """Sweep the complete checkpoints, wait `watch.poll_s`, sweep again, until the sentinel file
    appears or `watch.timeout_s` passes (then one last sweep). Every round recomputes only what
    is new. Returns the worst exit status of the rounds."""
    sentinel = Path(cfg.watch.sentinel) if cfg.watch.sentinel else None
    if sentinel is not None and not sentinel.is_absolute() and cfg.checkpoints.dir:
        sentinel = Path(cfg.checkpoints.dir) / sentinel
    deadline = time.monotonic() + cfg.watch.timeout_s if cfg.watch.timeout_s else float("inf")
    status, rounds = 0, 0
    while True:
        last = (sentinel is not None and sentinel.exists()) or time.monotonic() >= deadline
        rounds += 1
        print(f"watch: round {rounds}" + (" (the last)" if last else ""), flush=True)
        status = max(status, run_monitor(cfg))
        if last:
            return status
        time.sleep(cfg.watch.poll_s)


def _stop_if_disk_full(result: StageResult) -> None:
    """Workers report a full disk as unit failures; no later unit can succeed, so stop there."""
    full = next((f for f in result.failures if f"[Errno {errno.ENOSPC}]" in f["message"]), None)
    if full is not None:
        raise OSError(errno.ENOSPC, "No space left on device", f"the output of {result.stage} unit {full['unit']}")


def _record(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    from moegrok.pipeline.record import record_stage
    from moegrok.pipeline.shards import prepare_shards

    shards = prepare_shards(cfg, run, refs)
    result = record_stage(cfg, run, refs, shards)
    result.failures = shards.failures + result.failures
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

    if cfg.tune.method != TuneMethod.none:
        from moegrok.pipeline.tune import tuned_refs

        refs = refs + tuned_refs(run, refs)
    return evaluate_stage(cfg, run, refs)


def _analyze(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
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
    outputs = [run.contrast, *((run.correlations, run.onsets) if run.accuracy.exists() else ())]
    if all(read_tags(path).get("inputs") == fingerprint(inputs) for path in outputs):
        return StageResult("analyze", units=1, skipped=1)
    metrics, memorized = pd.read_parquet(run.metrics), pd.read_parquet(run.memorized)
    tags["inputs"] = fingerprint(inputs)
    contrast = run_contrasts(run, causal_memorization(metrics, memorized_accuracy=cfg.analysis.memorized_accuracy),
                             control=cfg.analysis.control, num_draws=cfg.analysis.bootstrap)
    write_parquet(contrast, run.contrast, tags=tags)
    if run.accuracy.exists():
        correlations, onsets = analyze(
            metrics, pd.read_parquet(run.accuracy), memorized, sample_set=cfg.analysis.sample_set,
            group_map=dict(cfg.analysis.group_map), min_rise=cfg.analysis.min_rise,
            memorized_accuracy=cfg.analysis.memorized_accuracy, min_n=cfg.analysis.min_n,
        )
        write_parquet(correlations, run.correlations, tags=tags)
        write_parquet(onsets, run.onsets, tags=tags)
    return StageResult("analyze", units=1, done=1)


def _report(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    """report.html, skipped when every table it shows is unchanged."""
    failures = pd.read_parquet(run.failures).drop(columns="time") if run.failures.exists() else None
    inputs = {"metrics": read_tags(run.metrics).get("reduce"), "accuracy": read_tags(run.accuracy).get("evaluate"),
              "analyze": read_tags(run.contrast).get("inputs"), "report version": REPORT_VERSION,
              "failures": None if failures is None else failures.to_json()}
    if is_done(run.report, fingerprint(inputs)):
        return StageResult("report", units=1, skipped=1)
    write_report(run.root)
    mark_done(run.report, inputs)
    return StageResult("report", units=1, done=1)


STAGES = {Stage.record: _record, Stage.reduce: _reduce, Stage.tune: _tune, Stage.evaluate: _evaluate,
          Stage.analyze: _analyze, Stage.report: _report}


def sync(run: RunDir, uri: str) -> None:
    """Copy the run directory to an fsspec URL (s3://, gs://, ...)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.put(str(run.root) + "/", path.rstrip("/") + "/", recursive=True)
