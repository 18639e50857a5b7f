"""Record stage: (checkpoint x sample shard) units on Ray actors -> routing/<ckpt>/shardNNNNN.parquet."""

from __future__ import annotations

import io
import time
import traceback

import pandas as pd
import pyarrow.parquet as pq
import ray
import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from moegrok.adapters import load_adapter
from moegrok.checkpoints import CheckpointRef, load_checkpoint
from moegrok.config import MonitorConfig
from moegrok.pipeline.cluster import actor_options
from moegrok.pipeline.scheduler import Unit, run_units
from moegrok.routing import RoutingRecorder, input_embeddings, router_weights
from moegrok.samples import TokenizedSample
from moegrok.store import RunDir, fingerprint, invalidate, is_done, mark_done


def failure(exc: BaseException) -> dict:
    return {"ok": False, "error_type": type(exc).__name__,
            "message": f"{exc}\n{''.join(traceback.format_exception(exc)[-3:])}"[-2000:]}


class RecordWorker:
    """Holds one checkpoint at a time and records sample shards on it."""

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.name: str | None = None
        self.recorder: RoutingRecorder | None = None
        self.tokenizer = None

    def _load(self, ref: CheckpointRef) -> None:
        if self.name == ref.name:
            return
        self.name, self.recorder = None, None
        model, self.tokenizer = load_checkpoint(ref, self.cfg.model, cache_dir=self.cfg.checkpoints.cache_dir,
                                                device=self.device)
        rec = self.cfg.record
        adapter = load_adapter(self.cfg.model.adapter) if self.cfg.model.adapter else None  # imported here, per actor
        self.recorder = RoutingRecorder(model, adapter=adapter, max_tokens_per_batch=rec.max_tokens_per_batch,
                                        loss_chunk_tokens=rec.loss_chunk_tokens, keep_input_ids=rec.keep_input_ids)
        self.name = ref.name

    def _checkpoint_weights(self) -> bytes:
        model = self.recorder.model
        tensors = {"routers": router_weights(model, adapter=self.recorder.adapter).contiguous()}
        num_residues = self.cfg.model.residue_tokens
        if num_residues:
            ids = self.tokenizer.convert_tokens_to_ids([str(i) for i in range(num_residues)])
            if self.tokenizer.unk_token_id is not None and self.tokenizer.unk_token_id in ids:
                raise ValueError(f"model.residue_tokens={num_residues}: tokens 0..{num_residues - 1} are not all "
                                 "single tokens of this tokenizer")
            tensors["residue_embeddings"] = input_embeddings(model, ids).contiguous()
        return save(tensors)

    def run(self, ref: CheckpointRef, samples: list[TokenizedSample], with_weights: bool) -> dict:
        start = time.perf_counter()
        try:
            self._load(ref)
            table = self.recorder.record(samples, checkpoint=ref.name, step=ref.step)
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            weights = self._checkpoint_weights() if with_weights else None
        except Exception as e:
            return failure(e)
        return {"ok": True, "routing": buffer.getvalue(), "weights": weights, "seconds": time.perf_counter() - start}


def tokens_fingerprint(shard: list[TokenizedSample]) -> str:
    return fingerprint([(s.sample_id, s.group, s.num_prompt_tokens, s.input_ids.tobytes().hex()) for s in shard])


def record_stage(cfg: MonitorConfig, run: RunDir, refs: list[CheckpointRef],
                 shards: list[list[TokenizedSample]]) -> dict:
    """Record every unit not already done under the same fingerprint. Returns counts and failures."""
    settings = (cfg.model.dtype, cfg.model.attn_implementation, cfg.model.experts_implementation,
                cfg.model.trust_remote_code, cfg.model.residue_tokens, cfg.record.keep_input_ids)
    settings += (cfg.model.adapter,) if cfg.model.adapter else ()  # runs without one keep their fingerprints
    shard_prints = [tokens_fingerprint(shard) for shard in shards]
    shard_refs = [ray.put(shard) for shard in shards]
    units, skipped = [], 0
    for ref in refs:
        for index in range(len(shards)):
            unit_print = fingerprint(ref, shard_prints[index], settings)
            path = run.routing_shard(ref.name, index)
            if is_done(path, unit_print) and (index or run.checkpoint_weights(ref.name).exists()):
                skipped += 1
                continue
            invalidate(path)
            units.append(Unit(ref.name, index, (ref, unit_print)))
    failures: list[dict] = []
    bar = tqdm(total=len(units), desc="record", disable=not cfg.progress, unit="shard")

    def on_done(unit: Unit, result: dict) -> None:
        ref, unit_print = unit.payload
        path = run.routing_shard(ref.name, unit.key)
        if result["ok"]:
            if result["weights"] is not None:
                write_bytes(run.checkpoint_weights(ref.name), result["weights"])
            write_bytes(path, result["routing"])
            mark_done(path, unit_print)
        else:
            failures.append({"stage": "record", "unit": f"{ref.name}/shard{unit.key:05d}",
                             "error_type": result["error_type"], "message": result["message"],
                             "time": pd.Timestamp.now(tz="UTC")})
        bar.update()

    remote = ray.remote(RecordWorker).options(**actor_options(cfg.record.num_gpus, cfg.record.num_cpus))
    run_units(
        units,
        make_actor=lambda: remote.remote(cfg),
        num_actors=cfg.record.num_actors,
        submit=lambda actor, unit: actor.run.remote(unit.payload[0], shard_refs[unit.key], unit.key == 0),
        on_done=on_done,
        max_retries=cfg.record.max_retries,
    )
    bar.close()
    return {"units": len(units) + skipped, "skipped": skipped, "done": len(units) - len(failures),
            "failed": len(failures), "failures": failures}


def write_bytes(path, data: bytes) -> None:
    """Atomic write of a finished file (temp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
