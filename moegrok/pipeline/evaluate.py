"""Evaluate stage: (checkpoint x benchmark) units on engine actors (vLLM or HF)
-> eval/<ckpt>/<benchmark>.parquet, then accuracy.parquet."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray

from moegrok.config import Engine, Sandbox, SweepConfig, config_yaml
from moegrok.data.checkpoints import CheckpointRef, check_local_dir, local_path, resolve_dtype
from moegrok.errors import BenchmarkError
from moegrok.evaluation.items import Item, content_digest, load_benchmark
from moegrok.evaluation.lm_eval_tasks import LmEvalItem
from moegrok.evaluation.scoring import SCORING_VERSION, accuracy_rows, score_items
from moegrok.pipeline.cluster import actor_options, init_ray
from moegrok.pipeline.executor import ActorPool, StageResult, Unit, UnitWorker, run_stage
from moegrok.store import (
    TUNED_SUFFIX,
    RunDir,
    done_fingerprint,
    error_fields,
    failure_row,
    fingerprint,
    read_markers,
    read_table,
    write_parquet,
)


def make_engine(cfg: SweepConfig):
    import torch  # here, on the engine actor: the driver plans units without torch

    from moegrok.evaluation.engines import HFEngine, VLLMEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.eval.engine == Engine.vllm or (cfg.eval.engine == Engine.auto and device == "cuda"):
        return VLLMEngine(tensor_parallel_size=cfg.eval.tensor_parallel_size,
                          gpu_memory_utilization=cfg.eval.gpu_memory_utilization,
                          dtype=str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch."),
                          trust_remote_code=cfg.model.trust_remote_code)
    return HFEngine(device=device, dtype=resolve_dtype(cfg.model.dtype, device), batch_size=cfg.eval.batch_size,
                    trust_remote_code=cfg.model.trust_remote_code)


class EvalWorker(UnitWorker):
    """One engine; checkpoints are swapped into it one after another."""

    def __init__(self, cfg: SweepConfig, benchmarks: dict[str, list[Item]]) -> None:
        self.cfg, self.benchmarks = cfg, benchmarks
        self.engine = make_engine(cfg)
        self.loaded: str | None = None

    def compute(self, unit: Unit) -> dict:
        ref: CheckpointRef = unit.payload["ref"]
        if self.loaded != ref.name:
            self.loaded = None
            path = local_path(ref, cache_dir=self.cfg.checkpoints.cache_dir)
            check_local_dir(path, ref.name)
            self.engine.load(str(path))
            self.loaded = ref.name
        scored = score_items(self.engine, self.benchmarks[unit.payload["benchmark"]],
                             max_new_tokens=self.cfg.eval.max_new_tokens, code_timeout_s=self.cfg.eval.code_timeout_s,
                             unisolated=self.cfg.eval.sandbox == Sandbox.unisolated)
        write_parquet(scored, unit.output)
        return {"items": len(scored)}


@dataclass
class Benchmarks:
    items: dict[str, list[Item | LmEvalItem]]  # by benchmark name, subsampled to eval.max_items
    hashes: dict[str, str]  # by name, a hash of the benchmark's files
    failures: list[dict]  # a malformed item (named file:line), a benchmark that cannot load at all


def load_benchmarks(cfg: SweepConfig) -> Benchmarks:
    """Every configured benchmark; a malformed item is left out, a benchmark that cannot load at
    all is left out, each with a failure row."""
    benchmarks, hashes, failures = {}, {}, []
    for bench in cfg.eval.benchmarks:
        errors: list[str] = []
        try:
            items = load_benchmark(bench.path, group_field=bench.group_field, id_field=bench.id_field,
                                   errors=errors)
        except Exception as e:
            failures.append(failure_row("evaluate", f"benchmark {bench.name} ({bench.path})", **error_fields(e)))
            continue
        finally:
            failures += [failure_row("evaluate", error.split(": ", 1)[0], BenchmarkError.__name__, error,
                                     kind="record") for error in errors]
        if cfg.eval.max_items and len(items) > cfg.eval.max_items:
            keep = np.sort(np.random.default_rng(0).choice(len(items), cfg.eval.max_items, replace=False))
            items = [items[i] for i in keep]
        benchmarks[bench.name] = items
        hashes[bench.name] = content_digest(bench.path)
    return Benchmarks(benchmarks, hashes, failures)


def evaluate_stage(cfg: SweepConfig, run: RunDir, refs: list[CheckpointRef], loaded: Benchmarks) -> StageResult:
    benchmarks, hashes, load_failures = loaded.items, loaded.hashes, loaded.failures
    settings = {f"eval.{key}": getattr(cfg.eval, key) for key in (
        "engine", "max_new_tokens", "max_items", "code_timeout_s", "sandbox")}
    settings |= {"model.dtype": cfg.model.dtype, "scoring version": SCORING_VERSION}
    units = [Unit(f"{ref.name}/{name}", ref.name, run.eval_items(ref.name, name),
                  {"checkpoint": ref.identity, "checkpoint content": ref.content, "benchmark": hashes[name],
                   **settings}, payload={"ref": ref, "benchmark": name})
             for ref in refs for name in benchmarks]

    def executor(todo: list[Unit]) -> ActorPool:
        init_ray(cfg.cluster)
        gpus_per_engine = cfg.eval.tensor_parallel_size if cfg.eval.engine != Engine.hf else 1
        options = actor_options(cfg.eval, auto_gpus=gpus_per_engine)
        return ActorPool(EvalWorker, cfg, ray.put(benchmarks), options=options, num_actors=cfg.eval.num_actors,
                         max_retries=cfg.eval.max_retries)

    result = run_stage("evaluate", units, executor, progress=cfg.progress)
    _, item_failures = write_accuracy(run, refs, list(benchmarks), config=config_yaml(cfg))
    result.failures = load_failures + result.failures + item_failures
    return result


def write_accuracy(run: RunDir, refs: list[CheckpointRef], names: list[str], *, config: str = ""
                   ) -> tuple[pd.DataFrame, list[dict]]:
    """accuracy.parquet: checkpoint, step, benchmark, group, accuracy, accuracy_norm, n, num_errors, tuned,
    base_checkpoint (a tuned checkpoint `<name>+tuned` belongs to `<name>`); and a failure row for
    every stored item that has no score, named checkpoint/benchmark/item id. `config` (YAML) is the
    config the scores come from, kept in the table's tags."""
    frames, failures, prints = [], [], []
    read_markers([run.eval_items(ref.name, name) for ref in refs for name in names])  # a LIST per checkpoint
    for ref in refs:
        for name in names:
            path = run.eval_items(ref.name, name)
            if (print_ := done_fingerprint(path)) is not None:
                prints.append(print_)
                scored = read_table(path).to_pandas()
                failures += [failure_row("evaluate", f"{ref.name}/{name}/{item_id}", "ItemError", error, kind="record")
                             for item_id, error in zip(scored["id"], scored["error"], strict=True)
                             if isinstance(error, str)]
                rows = accuracy_rows(scored, checkpoint=ref.name, step=ref.step, benchmark=name)
                tuned = ref.name.endswith(TUNED_SUFFIX)
                frames.append(rows.assign(tuned=tuned, base_checkpoint=ref.name.removesuffix(TUNED_SUFFIX)))
    columns = ["checkpoint", "step", "benchmark", "group", "accuracy", "accuracy_norm", "n", "num_errors", "unisolated",
               "tuned", "base_checkpoint"]
    accuracy = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    write_parquet(accuracy, run.accuracy, tags={"evaluate": fingerprint(sorted(prints)), "config": config})
    return accuracy, failures
