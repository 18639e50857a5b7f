"""Tune stage (optional): LoRA-tune every checkpoint on actors -> tuned/<ckpt>+tuned/ model dirs,
which the evaluate stage scores next to the untuned checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib

import pandas as pd
import ray

from moegrok.config import SweepConfig, as_plain
from moegrok.data.checkpoints import CheckpointRef, check_local_dir, content_key, local_path, resolve_dtype
from moegrok.data.samples import select_samples
from moegrok.evaluation.tuning import TuneResult, read_instructions, tune_checkpoint
from moegrok.pipeline.cluster import actor_options, init_ray
from moegrok.pipeline.executor import ActorPool, StageResult, Unit, UnitWorker, run_stage
from moegrok.store import TUNED_SUFFIX, RunDir, done_fingerprint


class TuneWorker(UnitWorker):
    def __init__(self, cfg: SweepConfig, pairs: list[tuple[str, str]]) -> None:
        import torch  # here, on the actor

        self.cfg, self.pairs = cfg, pairs
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def compute(self, unit: Unit) -> dict:
        ref: CheckpointRef = unit.payload
        path = local_path(ref, cache_dir=self.cfg.checkpoints.cache_dir)
        check_local_dir(path, ref.name)
        result = tune_checkpoint(path, unit.output, self.pairs, self.cfg.tune, device=self.device,
                                 dtype=resolve_dtype(self.cfg.model.dtype, self.device))
        return {"checkpoint": ref.name, **dataclasses.asdict(result)}


def instruction_pairs(cfg: SweepConfig) -> tuple[list[tuple[str, str]], str]:
    """The instruction data and its content hash: tune.data, else the sweep's prompt/completion samples."""
    if cfg.tune.data:
        pairs = read_instructions(cfg.tune.data, max_examples=cfg.tune.max_examples)
    else:
        frame = select_samples(cfg.samples).dropna(subset=["prompt", "completion"])
        if frame.empty:
            raise ValueError("tune.data is unset and the samples have no prompt/completion pairs to tune on")
        pairs = list(zip(frame["prompt"], frame["completion"], strict=True))
        pairs = pairs[: cfg.tune.max_examples] if cfg.tune.max_examples else pairs
    return pairs, hashlib.sha256(repr(pairs).encode()).hexdigest()


def tuned_refs(run: RunDir, refs: list[CheckpointRef]) -> list[CheckpointRef]:
    """The derived checkpoints already tuned in this run dir."""
    tuned = [CheckpointRef(f"{ref.name}{TUNED_SUFFIX}", ref.step, ref.tokens, uri=str(run.tuned(ref.name)))
             for ref in refs if done_fingerprint(run.tuned(ref.name)) is not None]
    return [dataclasses.replace(ref, content=content_key(ref)) for ref in tuned]


def tune_stage(cfg: SweepConfig, run: RunDir, refs: list[CheckpointRef]) -> StageResult:
    pairs, data_hash = instruction_pairs(cfg)
    # what changes a tuned model: the method's hyper-parameters, not where or how often it runs
    settings = {f"tune.{k}": v for k, v in as_plain(cfg.tune).items()
                if k not in ("num_actors", "num_gpus", "num_cpus", "max_retries")}
    units = [Unit(ref.name, ref.name, run.tuned(ref.name),
                  {"checkpoint": ref.identity, "checkpoint content": ref.content, "tune data": data_hash,
                   "model.dtype": cfg.model.dtype, **settings}, payload=ref) for ref in refs]

    def executor(todo: list[Unit]) -> ActorPool:
        init_ray(cfg.cluster)
        return ActorPool(TuneWorker, cfg, ray.put(pairs), options=actor_options(cfg.tune),
                         num_actors=cfg.tune.num_actors, max_retries=cfg.tune.max_retries)

    result = run_stage("tune", units, executor, progress=cfg.progress)
    if result.receipts:
        columns = ["checkpoint", *(f.name for f in dataclasses.fields(TuneResult))]
        print(pd.DataFrame(result.receipts)[columns].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return result
