"""Tune stage (optional): LoRA-tune every checkpoint on actors -> tuned/<ckpt>+tuned/ model dirs,
which the evaluate stage scores next to the untuned checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import pandas as pd
import ray
import torch
from tqdm.auto import tqdm

from moegrok.checkpoints import CheckpointRef, check_local_dir, local_path, resolve_dtype
from moegrok.config import MonitorConfig
from moegrok.pipeline.cluster import actor_options
from moegrok.pipeline.record import failure
from moegrok.pipeline.scheduler import Unit, run_units
from moegrok.samples import select_samples
from moegrok.store import RunDir, done_marker, fingerprint, invalidate, is_done, mark_done
from moegrok.tuning import read_instructions, tune_checkpoint

TUNED_SUFFIX = "+tuned"


class TuneWorker:
    def __init__(self, cfg: MonitorConfig, pairs: list[tuple[str, str]]) -> None:
        self.cfg, self.pairs = cfg, pairs
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def run(self, ref: CheckpointRef, out_dir: str) -> dict:
        try:
            path = local_path(ref, cache_dir=self.cfg.checkpoints.cache_dir)
            check_local_dir(path, ref.name)
            result = tune_checkpoint(path, out_dir, self.pairs, self.cfg.tune, device=self.device,
                                     dtype=resolve_dtype(self.cfg.model.dtype, self.device))
        except Exception as e:
            return failure(e)
        return {"ok": True, "result": dataclasses.asdict(result)}


def instruction_pairs(cfg: MonitorConfig) -> tuple[list[tuple[str, str]], str]:
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


def tuned_path(run: RunDir, ref: CheckpointRef) -> Path:
    return run.root / "tuned" / f"{ref.name}{TUNED_SUFFIX}"


def tuned_refs(run: RunDir, refs: list[CheckpointRef]) -> list[CheckpointRef]:
    """The derived checkpoints already tuned in this run dir."""
    return [CheckpointRef(f"{ref.name}{TUNED_SUFFIX}", ref.step, ref.tokens, uri=str(tuned_path(run, ref)))
            for ref in refs if done_marker(tuned_path(run, ref)).exists()]


def tune_stage(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef]) -> dict:
    pairs, data_hash = instruction_pairs(cfg)
    settings = dataclasses.asdict(cfg.tune) | {"num_actors": None, "num_gpus": None, "num_cpus": None}
    prints = {ref.name: fingerprint(ref, data_hash, settings, cfg.model.dtype) for ref in refs}
    units = [Unit(ref.name, 0, ref) for ref in refs if not is_done(tuned_path(run, ref), prints[ref.name])]
    for unit in units:
        invalidate(tuned_path(run, unit.payload))
    failures: list[dict] = []
    results = []
    bar = tqdm(total=len(units), desc="tune", disable=not cfg.progress, unit="ckpt")

    def on_done(unit: Unit, result: dict) -> None:
        ref = unit.payload
        if result["ok"]:
            mark_done(tuned_path(run, ref), prints[ref.name])
            results.append({"checkpoint": ref.name, **result["result"]})
        else:
            failures.append({"stage": "tune", "unit": ref.name, "error_type": result["error_type"],
                             "message": result["message"], "time": pd.Timestamp.now(tz="UTC")})
        bar.update()

    start = time.perf_counter()
    remote = ray.remote(TuneWorker).options(**actor_options(cfg.tune.num_gpus, cfg.tune.num_cpus))
    pairs_ref = ray.put(pairs)
    run_units(units, make_actor=lambda: remote.remote(cfg, pairs_ref), num_actors=cfg.tune.num_actors,
              submit=lambda actor, unit: actor.run.remote(unit.payload, str(tuned_path(run, unit.payload))),
              on_done=on_done, max_retries=cfg.tune.max_retries)
    bar.close()
    if results:
        print(pd.DataFrame(results).to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return {"units": len(refs), "skipped": len(refs) - len(units), "done": len(units) - len(failures),
            "failed": len(failures), "failures": failures, "seconds": time.perf_counter() - start}
