"""The whole sweep: catalog -> record -> reduce -> evaluate -> analyze -> report, one run dir."""

from __future__ import annotations

import time

import pandas as pd
from omegaconf import OmegaConf

from moegrok.analysis import analyze
from moegrok.checkpoints import CheckpointError, build_catalog, catalog_frame, local_path, refs_from_frame
from moegrok.config import MonitorConfig
from moegrok.pipeline.cluster import init_ray
from moegrok.report import summary_table, verdicts, write_report
from moegrok.samples import select_samples, shard_samples, tokenize_samples
from moegrok.store import RunDir, write_failures, write_parquet

STAGE_ORDER = ("record", "reduce", "tune", "evaluate", "analyze", "report")


def _now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC")


def prepare_samples(cfg: MonitorConfig, run: RunDir, refs) -> tuple[list, list[dict]]:
    """Select and tokenize the samples (tokenizer of the first loadable checkpoint) and shard them."""
    from transformers import AutoTokenizer

    errors: list[str] = []
    frame = select_samples(cfg.samples, errors=errors)
    failures = [{"stage": "samples", "unit": e.split(": ", 1)[0], "error_type": "SampleError", "message": e,
                 "time": _now()} for e in errors]
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


def _catalog(cfg: MonitorConfig, run: RunDir, stages: list[str]):
    if {"record", "tune", "evaluate"} & set(stages) or not run.catalog.exists():
        refs = build_catalog(cfg.checkpoints)
        write_parquet(catalog_frame(refs), run.catalog)
        return refs
    return refs_from_frame(pd.read_parquet(run.catalog))


def run_monitor(cfg: MonitorConfig, stages: list[str] | None = None) -> int:
    """Run the configured stage(s) (`stages` overrides cfg.stage); returns the exit status
    (1 when anything failed)."""
    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    run.config.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    if stages is None:
        stages = list(STAGE_ORDER) if cfg.stage == "all" else [cfg.stage]
    if not cfg.eval.enabled or not cfg.eval.benchmarks:
        stages = [s for s in stages if s != "evaluate"]
    if cfg.tune.method == "none":
        stages = [s for s in stages if s != "tune"]
    refs = _catalog(cfg, run, stages)
    summary = []
    if {"record", "reduce", "tune", "evaluate"} & set(stages):
        init_ray(cfg.cluster)
    for stage in stages:
        if stage == "analyze" and not run.accuracy.exists():
            print("analyze: skipped, no accuracy.parquet (evaluation is off and none is stored)")
            continue
        start = time.perf_counter()
        result = STAGES[stage](cfg, run, refs)
        if "failures" in result:  # the record stage also reports malformed samples
            write_failures(run, {stage, "samples"} if stage == "record" else {stage}, result["failures"])
        summary.append({"stage": stage, **{k: result.get(k, "") for k in ("units", "skipped", "done", "failed")},
                        "seconds": round(time.perf_counter() - start, 1)})
    table = pd.DataFrame(summary)
    print("\nmoegrok sweep summary (" + str(run.root) + ")\n" + table.to_string(index=False))
    if run.correlations.exists() and "report" in stages:
        correlations = pd.read_parquet(run.correlations)
        if correlations["spearman"].notna().any():
            print("\nSpearman with accuracy after memorization (* = beats step and loss baselines, detrended too)")
            print(summary_table(correlations).to_string(index=False))
            onsets = pd.read_parquet(run.onsets) if run.onsets.exists() else None
            print("\n".join(verdicts(correlations, onsets)))
    if cfg.cluster.sync_uri:
        sync(run, cfg.cluster.sync_uri)
    failed = sum(int(row["failed"] or 0) for row in summary)
    if failed:
        print(f"\n{failed} unit(s) failed; see {run.failures}")
    return 1 if failed else 0


def _record(cfg, run, refs) -> dict:
    from moegrok.pipeline.record import record_stage

    shards, sample_failures = prepare_samples(cfg, run, refs)
    result = record_stage(cfg, run, refs, shards)
    result["failures"] = sample_failures + result["failures"]
    result["failed"] += len(sample_failures)
    return result


def _reduce(cfg, run, refs) -> dict:
    from moegrok.pipeline.reduce import reduce_stage

    num_shards = int(pd.read_parquet(run.samples, columns=["shard"])["shard"].max()) + 1
    return reduce_stage(cfg, run, refs, num_shards)


def _tune(cfg, run, refs) -> dict:
    from moegrok.pipeline.tune import tune_stage

    return tune_stage(cfg, run, refs)


def _evaluate(cfg, run, refs) -> dict:
    from moegrok.pipeline.evaluate import evaluate_stage
    from moegrok.pipeline.tune import tuned_refs

    return evaluate_stage(cfg, run, refs + (tuned_refs(run, refs) if cfg.tune.method != "none" else []))


def _analyze(cfg, run, refs) -> dict:
    if not (run.metrics.exists() and run.accuracy.exists() and run.memorized.exists()):
        raise RuntimeError(f"{run.root}: analyze needs metrics.parquet, accuracy.parquet and memorized.parquet")
    correlations, onsets = analyze(
        pd.read_parquet(run.metrics), pd.read_parquet(run.accuracy), pd.read_parquet(run.memorized),
        sample_set=cfg.analysis.sample_set, group_map=dict(cfg.analysis.group_map), min_rise=cfg.analysis.min_rise,
        memorized_accuracy=cfg.analysis.memorized_accuracy,
    )
    write_parquet(correlations, run.correlations)
    write_parquet(onsets, run.onsets)
    return {"units": len(onsets), "done": len(onsets), "skipped": 0, "failed": 0}


def _report(cfg, run, refs) -> dict:
    write_report(run.root)
    return {"units": 1, "done": 1, "skipped": 0, "failed": 0}


STAGES = {"record": _record, "reduce": _reduce, "tune": _tune, "evaluate": _evaluate, "analyze": _analyze,
          "report": _report}


def sync(run: RunDir, uri: str) -> None:
    """Copy the run directory to an fsspec URL (s3://, gs://, ...)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.put(str(run.root) + "/", path.rstrip("/") + "/", recursive=True)
