"""Record stage: (checkpoint x sample shard) units on actors -> routing/<ckpt>/shardNNNNN.parquet,
and per checkpoint its router weight rows and residue embeddings (weights.safetensors)."""

from __future__ import annotations

import ray

from moegrok.config import Storage, SweepConfig
from moegrok.data.checkpoints import CheckpointRef, load_checkpoint
from moegrok.data.samples import TokenizedSample
from moegrok.metrics.compact import compact_table
from moegrok.pipeline.cluster import actor_options, init_ray
from moegrok.pipeline.executor import ActorPool, StageResult, Unit, UnitWorker, run_stage
from moegrok.pipeline.shards import Shards
from moegrok.store import AnyPath, RunDir, configure_storage, invalidate, write_bytes, write_parquet


class RecordWorker(UnitWorker):
    """Holds one checkpoint at a time and records sample shards on it."""

    def __init__(self, cfg: SweepConfig, run_root: AnyPath) -> None:
        import torch  # here, on the actor: the driver plans units without torch

        self.cfg, self.run = cfg, RunDir(run_root)  # a URL root carries its storage options
        configure_storage(cfg.storage.options)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.name: str | None = None
        self.recorder = None
        self.tokenizer = None

    def _load(self, ref: CheckpointRef) -> None:
        from moegrok.routing.adapters import load_adapter
        from moegrok.routing.recorder import RoutingRecorder

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
        from safetensors.torch import save

        from moegrok.routing.recorder import input_embeddings, router_weights

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

    def compute(self, unit: Unit) -> dict:
        ref: CheckpointRef = unit.payload["ref"]
        self._load(ref)
        samples: list[TokenizedSample] = ray.get(unit.payload["samples"])
        table = self.recorder.record(samples, checkpoint=ref.name, step=ref.step)
        if self.cfg.record.storage == Storage.compact:
            table = compact_table(table, positions=[str(p) for p in self.cfg.metrics.positions],
                                  keep_tokens=unit.payload["keep_tokens"])
        if unit.payload["with_weights"]:
            write_bytes(self._checkpoint_weights(), self.run.checkpoint_weights(ref.name))
        write_parquet(table, unit.output)
        return {"rows": table.num_rows, "bytes": unit.output.stat().st_size}


def token_samples(members: list[list[tuple[str, str]]], *, per_group: int) -> set[str]:
    """The samples whose token-level routing a compact table keeps: the first `per_group` of each
    group in sample order (the same in every checkpoint, so the routing analyses line up)."""
    counts: dict[str, int] = {}
    keep = set()
    for sample_id, group in (member for shard in members for member in shard):
        if counts.get(group, 0) < per_group:
            counts[group] = counts.get(group, 0) + 1
            keep.add(sample_id)
    return keep


def record_stage(cfg: SweepConfig, run: RunDir, refs: list[CheckpointRef], shards: Shards) -> StageResult:
    """Record every (checkpoint, shard) unit not already done with the same inputs. Shard 0 of a
    checkpoint also writes its weights file."""
    settings = {f"model.{key}": getattr(cfg.model, key) for key in (
        "dtype", "attn_implementation", "experts_implementation", "trust_remote_code", "residue_tokens", "adapter")}
    settings["record.keep_input_ids"] = cfg.record.keep_input_ids
    settings["record.storage"] = cfg.record.storage
    keep = token_samples(shards.members, per_group=cfg.record.token_samples_per_group)
    if cfg.record.storage == Storage.compact:  # what the compact table holds depends on these too
        settings["metrics.positions"] = [str(p) for p in cfg.metrics.positions]
        settings["record.token_samples_per_group"] = cfg.record.token_samples_per_group
    units = []
    for ref in refs:
        if not run.checkpoint_weights(ref.name).exists():
            invalidate(run.routing_shard(ref.name, 0))
        units += [Unit(f"{ref.name}/shard{index:05d}", ref.name, run.routing_shard(ref.name, index),
                       {"checkpoint": ref.identity, "checkpoint content": ref.content,
                        "samples": shards.prints[index], **settings},
                       payload={"ref": ref, "shard": index, "with_weights": index == 0,
                                "keep_tokens": [sample_id for sample_id, _ in members if sample_id in keep]})
                  for index, members in enumerate(shards.members) if members]

    def executor(todo: list[Unit]) -> ActorPool:
        init_ray(cfg.cluster)
        tokenized = shards.load()
        shard_refs = {index: ray.put(tokenized[index]) for index in sorted({u.payload["shard"] for u in todo})}
        for unit in todo:
            unit.payload["samples"] = shard_refs[unit.payload["shard"]]
        return ActorPool(RecordWorker, cfg, run.root, num_actors=cfg.record.num_actors,
                         options=actor_options(cfg.record), max_retries=cfg.record.max_retries)

    return run_stage("record", units, executor, progress=cfg.progress)
