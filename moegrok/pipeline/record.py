"""Record stage: (checkpoint x sample shard) units on actors -> routing/<ckpt>/shardNNNNN.parquet,
and per checkpoint its router weight rows and residue embeddings (weights.safetensors)."""

from __future__ import annotations

import ray

from moegrok.config import Storage, SweepConfig
from moegrok.data.checkpoints import CheckpointRef, load_checkpoint
from moegrok.data.samples import TokenizedSample
from moegrok.errors import ConfigError
from moegrok.metrics.compact import compact_table
from moegrok.pipeline.cluster import actor_options, init_ray
from moegrok.pipeline.executor import ActorPool, StageResult, Unit, UnitWorker, run_stage
from moegrok.pipeline.shards import Shards
from moegrok.store import AnyPath, RunDir, configure_storage, invalidate, read_metadata, write_bytes, write_parquet


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
        from moegrok.routing.compiled import auto_token_budget, compiled_recorder
        from moegrok.routing.fused_moe import set_experts_implementation
        from moegrok.routing.recorder import RoutingRecorder
        from moegrok.routing.settings import compile_enabled

        if self.name == ref.name:
            return
        host = self.recorder.model if self.recorder is not None else None
        self.name = None
        model, self.tokenizer = load_checkpoint(ref, self.cfg.model, cache_dir=self.cfg.checkpoints.cache_dir,
                                                device=self.device, host=host)
        if model is not host:  # the first checkpoint, or another architecture: a new recorder (and compilation)
            self.recorder = None
            set_experts_implementation(model, self.cfg.model.experts_implementation, self.device)
            rec = self.cfg.record
            adapter = load_adapter(self.cfg.model.adapter) if self.cfg.model.adapter else None  # imported per actor
            compiled = compile_enabled(rec.compile, self.device)
            options = dict(adapter=adapter, loss_chunk_tokens=rec.loss_chunk_tokens, keep_input_ids=rec.keep_input_ids,
                           max_tokens_per_batch=rec.max_tokens_per_batch
                           or auto_token_budget(model, self.device, adapter=adapter, padded=compiled))
            self.recorder = compiled_recorder(model, **options) if compiled else RoutingRecorder(model, **options)
            self.recorder.metadata = record_settings(model, compiled=compiled)
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


def record_settings(model, *, compiled: bool) -> dict[str, str]:
    """What a routing table was recorded with, beyond its inputs: a different kernel or precision is
    a different routing record, so a sweep holds these fixed across checkpoints."""
    config = model.config
    return {"architecture": ",".join(getattr(config, "architectures", None) or [type(model).__name__]),
            "experts_implementation": str(getattr(config, "_experts_implementation", None) or "eager"),
            "compiled": str(compiled).lower(), "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


RECORD_SETTINGS = ("architecture", "experts_implementation", "compiled", "dtype")


def check_record_settings(run: RunDir, refs: list[CheckpointRef], num_shards: int) -> None:
    """Refuse routing tables of one architecture recorded with different experts implementations,
    compilation or dtype across checkpoints (a sweep over several families may differ between them)."""
    seen: dict[str, dict[tuple[str, ...], list[str]]] = {}
    for ref in refs:
        for index in range(num_shards):
            path = run.routing_shard(ref.name, index)
            if path.exists():
                metadata = read_metadata(path)
                architecture, *key = (metadata.get(name.encode(), b"?").decode() for name in RECORD_SETTINGS)
                if architecture != "?":
                    seen.setdefault(architecture, {}).setdefault(tuple(key), []).append(f"{ref.name}/shard{index:05d}")
    for architecture, kinds in seen.items():
        if len(kinds) > 1:
            said = "; ".join(f"{', '.join(f'{n}={v}' for n, v in zip(RECORD_SETTINGS[1:], key, strict=True))} "
                             f"({units[0]}{f' and {len(units) - 1} more' if len(units) > 1 else ''})"
                             for key, units in kinds.items())
            raise ConfigError(f"{architecture} routing tables of this sweep were recorded with different settings: "
                              f"{said}. Record every checkpoint with the same model.experts_implementation, "
                              "record.compile and model.dtype (set them explicitly instead of auto, and delete the "
                              "odd routing/ directories)")


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
    settings["record.compile"] = cfg.record.compile
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
        from moegrok.routing.settings import compile_enabled, resolve_implementation

        init_ray(cfg.cluster)
        device = "cuda" if actor_options(cfg.record)["num_gpus"] > 0 else "cpu"
        experts = (resolve_implementation(cfg.model.experts_implementation, device, probe=False)
                   or "transformers' default")
        compiled = "on" if compile_enabled(cfg.record.compile, device) else "off"
        print(f"record: {len(todo)} units on {device}, experts {experts} "
              f"(model.experts_implementation={cfg.model.experts_implementation}), compile {compiled} "
              f"(record.compile={'null' if cfg.record.compile is None else cfg.record.compile}), "
              f"model.dtype={cfg.model.dtype}")
        tokenized = shards.load()
        shard_refs = {index: ray.put(tokenized[index]) for index in sorted({u.payload["shard"] for u in todo})}
        for unit in todo:
            unit.payload["samples"] = shard_refs[unit.payload["shard"]]
        return ActorPool(RecordWorker, cfg, run.root, num_actors=cfg.record.num_actors,
                         options=actor_options(cfg.record), max_retries=cfg.record.max_retries)

    result = run_stage("record", units, executor, progress=cfg.progress)
    check_record_settings(run, refs, len(shards.members))
    return result
