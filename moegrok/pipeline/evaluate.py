"""Evaluate stage: benchmarks scored for every checkpoint on engine actors (vLLM or HF)
-> eval/<ckpt>/<benchmark>.parquet and accuracy.parquet."""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray
import torch
from tqdm.auto import tqdm

from moegrok.checkpoints import CheckpointRef, check_local_dir, local_path, resolve_dtype
from moegrok.config import MonitorConfig
from moegrok.evaluation.benchmarks import Item, load_benchmark
from moegrok.evaluation.engines import HFEngine, VLLMEngine
from moegrok.evaluation.scoring import accuracy_rows, score_items
from moegrok.pipeline.cluster import actor_options
from moegrok.pipeline.record import failure, write_bytes
from moegrok.pipeline.scheduler import Unit, run_units
from moegrok.pipeline.tune import TUNED_SUFFIX
from moegrok.store import RunDir, done_marker, fingerprint, invalidate, is_done, mark_done, write_parquet


def make_engine(cfg: MonitorConfig):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.eval.engine == "vllm" or (cfg.eval.engine == "auto" and device == "cuda"):
        return VLLMEngine(tensor_parallel_size=cfg.eval.tensor_parallel_size,
                          gpu_memory_utilization=cfg.eval.gpu_memory_utilization,
                          dtype=str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch."),
                          trust_remote_code=cfg.model.trust_remote_code)
    return HFEngine(device=device, dtype=resolve_dtype(cfg.model.dtype, device), batch_size=cfg.eval.batch_size,
                    trust_remote_code=cfg.model.trust_remote_code)


class EvalWorker:
    """One engine; checkpoints are swapped into it one after another."""

    def __init__(self, cfg: MonitorConfig, benchmarks: dict[str, list[Item]]) -> None:
        self.cfg, self.benchmarks = cfg, benchmarks
        self.engine = make_engine(cfg)
        self.loaded: str | None = None

    def run(self, ref: CheckpointRef, names: list[str]) -> dict:
        start = time.perf_counter()
        try:
            if self.loaded != ref.name:
                self.loaded = None
                path = local_path(ref, cache_dir=self.cfg.checkpoints.cache_dir)
                check_local_dir(path, ref.name)
                self.engine.load(str(path))
                self.loaded = ref.name
            tables = {}
            for name in names:
                scored = score_items(self.engine, self.benchmarks[name], max_new_tokens=self.cfg.eval.max_new_tokens,
                                     code_timeout_s=self.cfg.eval.code_timeout_s)
                buffer = io.BytesIO()
                scored.to_parquet(buffer, index=False)
                tables[name] = buffer.getvalue()
        except Exception as e:
            return failure(e)
        return {"ok": True, "tables": tables, "seconds": time.perf_counter() - start}


def load_benchmarks(cfg: MonitorConfig) -> tuple[dict[str, list[Item]], dict[str, str], list[dict]]:
    """Benchmarks by name (subsampled to eval.max_items), their content hashes, load failures."""
    benchmarks, hashes, failures = {}, {}, []
    for bench in cfg.eval.benchmarks:
        try:
            items = load_benchmark(bench.path, group_field=bench.group_field, id_field=bench.id_field)
        except Exception as e:
            failures.append({"stage": "evaluate", "unit": f"benchmark {bench.name} ({bench.path})",
                             "error_type": type(e).__name__, "message": str(e), "time": pd.Timestamp.now(tz="UTC")})
            continue
        if cfg.eval.max_items and len(items) > cfg.eval.max_items:
            keep = np.sort(np.random.default_rng(0).choice(len(items), cfg.eval.max_items, replace=False))
            items = [items[i] for i in keep]
        benchmarks[bench.name] = items
        hashes[bench.name] = hashlib.sha256(Path(bench.path).read_bytes()).hexdigest()
    return benchmarks, hashes, failures


def evaluate_stage(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef]) -> dict:
    benchmarks, hashes, failures = load_benchmarks(cfg)
    settings = (cfg.eval.engine, cfg.eval.max_new_tokens, cfg.eval.max_items, cfg.eval.code_timeout_s, cfg.model.dtype)
    prints = {(ref.name, name): fingerprint(ref, hashes[name], settings) for ref in refs for name in benchmarks}
    units = []
    for ref in refs:
        todo = [n for n in benchmarks if not is_done(run.eval_items(ref.name, n), prints[ref.name, n])]
        for name in todo:
            invalidate(run.eval_items(ref.name, name))
        if todo:
            units.append(Unit(ref.name, tuple(todo), ref))
    bar = tqdm(total=len(units), desc="evaluate", disable=not cfg.progress, unit="ckpt")

    def on_done(unit: Unit, result: dict) -> None:
        ref = unit.payload
        if result["ok"]:
            for name, data in result["tables"].items():
                path = run.eval_items(ref.name, name)
                write_bytes(path, data)
                mark_done(path, prints[ref.name, name])
        else:
            failures.append({"stage": "evaluate", "unit": ref.name, "error_type": result["error_type"],
                             "message": result["message"], "time": pd.Timestamp.now(tz="UTC")})
        bar.update()

    gpus_per_engine = cfg.eval.tensor_parallel_size if cfg.eval.engine != "hf" else 1
    options = actor_options(cfg.eval.num_gpus, cfg.eval.num_cpus, auto_gpus=gpus_per_engine)
    remote = ray.remote(EvalWorker).options(**options)
    benchmarks_ref = ray.put(benchmarks)
    run_units(units, make_actor=lambda: remote.remote(cfg, benchmarks_ref), num_actors=cfg.eval.num_actors,
              submit=lambda actor, unit: actor.run.remote(unit.payload, list(unit.key)), on_done=on_done,
              max_retries=cfg.eval.max_retries)
    bar.close()
    write_accuracy(run, refs, list(benchmarks))
    failed_units = sum(1 for f in failures if not f["unit"].startswith("benchmark "))
    return {"units": len(refs), "skipped": len(refs) - len(units), "done": len(units) - failed_units,
            "failed": len(failures), "failures": failures}


def write_accuracy(run: RunDir, refs: list[CheckpointRef], names: list[str]) -> pd.DataFrame:
    """accuracy.parquet: checkpoint, step, benchmark, group, accuracy, accuracy_norm, n, num_errors, tuned,
    base_checkpoint (a tuned checkpoint `<name>+tuned` belongs to `<name>`)."""
    frames = []
    for ref in refs:
        for name in names:
            path = run.eval_items(ref.name, name)
            if path.exists() and done_marker(path).exists():
                rows = accuracy_rows(pq.read_table(path).to_pandas(), checkpoint=ref.name, step=ref.step,
                                     benchmark=name)
                tuned = ref.name.endswith(TUNED_SUFFIX)
                frames.append(rows.assign(tuned=tuned, base_checkpoint=ref.name.removesuffix(TUNED_SUFFIX)))
    columns = ["checkpoint", "step", "benchmark", "group", "accuracy", "accuracy_norm", "n", "num_errors", "tuned",
               "base_checkpoint"]
    accuracy = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    write_parquet(accuracy, run.accuracy)
    return accuracy
