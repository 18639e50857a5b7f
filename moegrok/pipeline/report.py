"""Report stage: report.html and figures/ from the stored tables, skipped when every table it shows
is unchanged."""

from __future__ import annotations

from moegrok.pipeline.executor import StageResult
from moegrok.report.run import REPORT_VERSION, write_report
from moegrok.store import RunDir, fingerprint, is_done, mark_done, read_parquet, read_tags


def report_stage(run: RunDir) -> StageResult:
    failures = read_parquet(run.failures).drop(columns="time") if run.failures.exists() else None
    inputs = {"metrics": read_tags(run.metrics).get("reduce"), "accuracy": read_tags(run.accuracy).get("evaluate"),
              "analyze": read_tags(run.contrast).get("inputs"), "report version": REPORT_VERSION,
              "failures": None if failures is None else failures.to_json()}
    if is_done(run.report, fingerprint(inputs)):
        return StageResult("report", units=1, skipped=1)
    write_report(run.root)
    mark_done(run.report, inputs)
    return StageResult("report", units=1, done=1)
