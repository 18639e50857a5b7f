"""Checkpoint catalog: local dirs, Hugging Face `repo@revision`, fsspec URLs -> CheckpointRef.

Steps (and tokens) come from the checkpoint's name. The common layouts are read by default:
OLMo / OLMoE branches (`step5000-tokens20B`, `stage1-step150-tokens1B`, `step1000`), Hugging Face
Trainer folders (`checkpoint-500`), DeepSpeed (`global_step500`) and Megatron (`iter_0000500`).
Others need a configured regex with named groups `step` and `tokens` (a number with unit
M/B/T), or an explicit `steps` mapping in the config.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from moegrok.config import CheckpointsConfig, ModelConfig
from moegrok.errors import CheckpointError
from moegrok.store import ObjectPath, as_path

NAME_FORMS = (  # the checkpoint names read by default, tried in order
    re.compile(r"^(?:stage\d+-)?step(?P<step>\d+)(?:-tokens(?P<tokens>\d+(?:\.\d+)?[MBT]))?$"),  # OLMo, OLMoE
    re.compile(r"^checkpoint-(?P<step>\d+)$"),  # Hugging Face Trainer
    re.compile(r"^global_step(?P<step>\d+)$"),  # DeepSpeed
    re.compile(r"^iter_(?P<step>\d+)$"),  # Megatron-LM
)
EXPECTED_FORMS = (
    "step5000, step5000-tokens20B, stage1-step150-tokens1B (OLMo / OLMoE), checkpoint-500 (HF Trainer), "
    "global_step500 (DeepSpeed) or iter_0000500 (Megatron); for other names set checkpoints.step_regex "
    "(named groups `step`, `tokens`) or checkpoints.steps"
)
TOKEN_UNITS = {"M": 1e6, "B": 1e9, "T": 1e12}


@dataclass(frozen=True)
class CheckpointRef:
    name: str  # unique, used in run-directory paths
    step: int
    tokens: float | None  # training tokens seen, if the name says
    uri: str  # local dir, HF repo id, or fsspec URL
    revision: str | None = None  # HF revision (branch / tag / commit)
    content: str = ""  # a cheap key of the checkpoint's files (`content_key`); "" = not looked at

    @property
    def identity(self) -> tuple:
        """What names the checkpoint, apart from its content."""
        return (self.name, self.step, self.tokens, self.uri, self.revision)

    @property
    def kind(self) -> str:
        if self.revision is not None:
            return "hub"
        return "url" if "://" in self.uri and not self.uri.startswith("file://") else "local"


def parse_name(name: str, *, step_regex: str | None = None, steps: dict[str, int] | None = None):
    """(step, tokens) from a checkpoint name."""
    if steps and name in steps:
        return int(steps[name]), None
    if step_regex:
        match = re.compile(step_regex).search(name)
    else:
        match = next((m for form in NAME_FORMS if (m := form.match(name))), None)
    if match is None or match.groupdict().get("step") is None:
        raise CheckpointError(f"checkpoint {name!r}: cannot read a step from its name; expected {EXPECTED_FORMS}")
    tokens = match.groupdict().get("tokens")
    if tokens:
        unit = tokens[-1].upper()
        if unit not in TOKEN_UNITS:
            raise CheckpointError(f"checkpoint {name!r}: token count {tokens!r} needs a unit M, B or T")
        tokens = float(tokens[:-1]) * TOKEN_UNITS[unit]
    return int(match["step"]), tokens


def _entry_ref(entry: str, cfg: CheckpointsConfig) -> CheckpointRef:
    if "://" in entry:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        return CheckpointRef(name, *parse_name(name, step_regex=cfg.step_regex, steps=cfg.steps), uri=entry)
    if "@" in entry and not Path(entry).exists():
        repo, revision = entry.rsplit("@", 1)
        step, tokens = parse_name(revision, step_regex=cfg.step_regex, steps=cfg.steps)
        return CheckpointRef(revision, step, tokens, uri=repo, revision=revision)
    name = Path(entry).name
    return CheckpointRef(name, *parse_name(name, step_regex=cfg.step_regex, steps=cfg.steps), uri=entry)


def _hub_revisions(repo: str) -> list[str]:
    from huggingface_hub import list_repo_refs

    try:
        return [branch.name for branch in list_repo_refs(repo).branches]
    except Exception as e:  # offline, unknown repo, auth
        raise CheckpointError(
            f"checkpoints.repo={repo!r}: cannot list revisions ({type(e).__name__}: {e}); "
            "give them in checkpoints.revisions"
        ) from e


def _is_checkpoint_name(name: str, cfg: CheckpointsConfig) -> bool:
    try:
        parse_name(name, step_regex=cfg.step_regex, steps=cfg.steps)
    except CheckpointError:
        return False
    return True


def _dir_refs(cfg: CheckpointsConfig) -> list[CheckpointRef]:
    """The checkpoints in `checkpoints.dir`: its subdirectories that match `checkpoints.pattern` and
    whose names are checkpoint names; the others are named in one line and left out."""
    root = as_path(cfg.dir)
    if isinstance(root, ObjectPath):  # a bucket prefix of checkpoint folders: one listing
        listed = {root / info.base_name: info.type == pafs.FileType.Directory for info in root.listing()}
        if not listed:
            raise CheckpointError(f"checkpoints.dir={cfg.dir!r}: nothing at that URL")
        matched = sorted(p for p, is_dir in listed.items() if is_dir and fnmatch.fnmatch(p.name, cfg.pattern))
    elif not root.is_dir():
        raise CheckpointError(f"checkpoints.dir={cfg.dir!r} is not a directory")
    else:
        matched = sorted(p for p in root.glob(cfg.pattern) if p.is_dir())
    named = [p for p in matched if _is_checkpoint_name(p.name, cfg)]
    if not named:
        listed = listed if isinstance(root, ObjectPath) else {p: p.is_dir() for p in root.iterdir()}
        entries = sorted(p.name + ("/" if is_dir else "") for p, is_dir in listed.items())
        shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} entries)" if len(entries) > 8 else "")
        raise CheckpointError(
            f"checkpoints.dir={cfg.dir!r}: no subdirectory matches checkpoints.pattern={cfg.pattern!r} with a "
            f"checkpoint name ({EXPECTED_FORMS}); its entries: {shown or 'none'}")
    skipped = [p.name for p in matched if p not in named]
    if skipped:
        print(f"checkpoints.dir={cfg.dir!r}: left out {len(skipped)} subdirector{'y' if len(skipped) == 1 else 'ies'} "
              f"whose names are not checkpoint names: {', '.join(skipped[:5])}" + (", ..." if len(skipped) > 5 else ""))
    return [_entry_ref(str(path), cfg) for path in named]


def build_catalog(cfg: CheckpointsConfig) -> list[CheckpointRef]:
    """Every configured checkpoint, sorted by step, after the step-range and spacing selection."""
    if not (cfg.dir or cfg.paths or cfg.repo):
        raise CheckpointError("no checkpoints configured: set checkpoints.dir, checkpoints.paths or checkpoints.repo")
    refs: list[CheckpointRef] = _dir_refs(cfg) if cfg.dir else []
    refs += [_entry_ref(entry, cfg) for entry in cfg.paths]
    if cfg.repo:
        revisions = cfg.revisions or _hub_revisions(cfg.repo)
        for revision in revisions:
            if revision in ("main", "fp32") and revision not in (cfg.steps or {}):
                continue  # the final model without a step in its name: map it in checkpoints.steps
            refs.append(_entry_ref(f"{cfg.repo}@{revision}", cfg))
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise CheckpointError(f"two checkpoints are named {duplicate!r}; names must be unique")
    refs.sort(key=lambda r: (r.step, r.name))
    found = refs
    refs = [r for r in refs if (cfg.min_step is None or r.step >= cfg.min_step)
            and (cfg.max_step is None or r.step <= cfg.max_step)]
    refs = refs[:: cfg.every_nth]
    if cfg.num_evenly_spaced and len(refs) > cfg.num_evenly_spaced:
        keep = np.unique(np.linspace(0, len(refs) - 1, cfg.num_evenly_spaced).round().astype(int))
        refs = [refs[i] for i in keep]
    if not refs:
        if found:
            raise CheckpointError(f"no checkpoint in the step range checkpoints.min_step={cfg.min_step}.."
                                  f"max_step={cfg.max_step}: the catalog's steps run from {found[0].step} to "
                                  f"{found[-1].step}")
        raise CheckpointError("the checkpoint catalog is empty: check checkpoints.dir, paths and repo")
    return refs


def catalog_frame(refs: list[CheckpointRef]) -> pd.DataFrame:
    return pd.DataFrame([asdict(r) for r in refs], columns=["name", "step", "tokens", "uri", "revision", "content"])


def refs_from_frame(frame: pd.DataFrame) -> list[CheckpointRef]:
    return [
        CheckpointRef(r["name"], int(r["step"]), None if pd.isna(r["tokens"]) else float(r["tokens"]),
                      r["uri"], None if pd.isna(r["revision"]) else r["revision"], r.get("content") or "")
        for r in frame.to_dict("records")
    ]


def content_key(ref: CheckpointRef) -> str:
    """A cheap key of a checkpoint's content, so that replacing its files in place re-runs what
    depends on them: name, size and modification time of every file of a local dir; name, size and
    modification time (or ETag) of the files at a URL; the revision of a hub checkpoint."""
    if ref.kind == "hub":
        return f"revision {ref.revision}"
    if ref.kind == "local":
        path = Path(ref.uri.removeprefix("file://"))
        if not path.is_dir():
            return "missing"
        files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir())
                 if f.is_file() and not f.name.startswith(".")]
    else:
        files = sorted((info.base_name, info.size, info.mtime_ns) for info in as_path(ref.uri).listing()
                       if info.type == pafs.FileType.File)
    return hashlib.sha256(repr(files).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- validation, loading


def check_safetensors(path: Path) -> None:
    """Raise if a safetensors file is truncated or its header is unreadable."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_size,) = struct.unpack("<Q", raw)
        if header_size > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors header")
        try:
            header = json.loads(f.read(header_size))
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_size + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} of {8 + header_size + end} bytes)")


def check_local_dir(path: Path, name: str) -> None:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {name!r}: {path} is not a directory")
    if not (path / "config.json").exists():
        raise CheckpointError(f"checkpoint {name!r}: {path} has no config.json")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"checkpoint {name!r}: {path} has no *.safetensors weights")
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {name!r}: unreadable {index.name} ({e})") from None
        missing = sorted(named - {file.name for file in weights})
        if missing:
            raise CheckpointError(f"checkpoint {name!r}: {index.name} names missing shards {missing[:3]}")
    for file in weights:
        try:
            check_safetensors(file)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {name!r}: {e}") from None


def incomplete(ref: CheckpointRef) -> str | None:
    """Why a checkpoint cannot be read yet (still being written: no config.json, missing or
    truncated weights), or None when it is complete. Hub revisions are complete."""
    if ref.kind == "hub":
        return None
    if ref.kind == "local":
        try:
            check_local_dir(Path(ref.uri.removeprefix("file://")), ref.name)
        except CheckpointError as e:
            return str(e)
        return None
    names = {info.base_name for info in as_path(ref.uri).listing()}
    if "config.json" not in names or not any(name.endswith(".safetensors") for name in names):
        return f"checkpoint {ref.name!r}: {ref.uri} has no config.json and *.safetensors yet"
    return None


def local_path(ref: CheckpointRef, *, cache_dir: str) -> Path:
    """A local directory holding the checkpoint: itself, a cached copy of a URL, or a hub
    snapshot (weights, config and tokenizer files only)."""
    if ref.kind == "local":
        return Path(ref.uri.removeprefix("file://"))
    if ref.kind == "hub":
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
        return Path(snapshot_download(ref.uri, revision=ref.revision, allow_patterns=patterns,
                                      cache_dir=str(Path(cache_dir) / "hub")))
    # a URL (s3://, gs://, any fsspec protocol): copied once per cache dir (each node's own) and
    # content key, so weights replaced in place at the same URL are copied again, never read stale
    target = Path(cache_dir) / hashlib.sha1(f"{ref.uri}\n{ref.content}".encode()).hexdigest()[:16] / ref.name
    marker = target.parent / ".complete"
    if not marker.exists():
        as_path(ref.uri).download(target)
        marker.touch()
    return target


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def context_length(path: Path, tokenizer) -> int:
    """The longest sequence a checkpoint takes: its config's position count, else the tokenizer's
    model_max_length when that is a real limit (tokenizers without one report ~1e30)."""
    config = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").exists() else {}
    for source in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            if isinstance(source.get(key), int) and source[key] > 1:
                return int(source[key])
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 1 < limit < 1_000_000:
        return limit
    raise CheckpointError(f"{path}: no context length in its config or tokenizer; set samples.max_tokens")


def load_tokenizer(refs: list[CheckpointRef], *, cache_dir: str, trust_remote_code: bool):
    """(tokenizer, checkpoint dir) of the first checkpoint whose tokenizer loads."""
    from transformers import AutoTokenizer

    problems = []
    for ref in refs:
        try:
            path = local_path(ref, cache_dir=cache_dir)
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code), path
        except Exception as e:
            problems.append(f"{ref.name}: {type(e).__name__}: {e}")
    raise CheckpointError("no checkpoint has a loadable tokenizer: " + "; ".join(problems))


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_checkpoint(ref: CheckpointRef, model_cfg: ModelConfig, *, cache_dir: str, device: str, host=None):
    """(model, tokenizer) of a checkpoint, safetensors only, remote code only if configured.

    `host`: a loaded model of the same architecture (config and parameter shapes) to copy the
    checkpoint's weights into, in place (a compiled decoder stays valid); the returned model is then
    `host` itself. Where it differs, a new model is returned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load is noise in a sweep

    try:
        path = local_path(ref, cache_dir=cache_dir)
        check_local_dir(path, ref.name)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=resolve_dtype(model_cfg.dtype, device),
            use_safetensors=True,
            trust_remote_code=model_cfg.trust_remote_code,
            attn_implementation=model_cfg.attn_implementation or None,  # None: transformers chooses
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {ref.name!r} ({ref.uri}): {type(e).__name__}: {e}") from e
    if host is not None and copy_weights(host, model):
        return host, tokenizer
    return model.to(device).eval(), tokenizer  # the experts implementation: the caller's (routing/fused_moe.py)


def _architecture(config) -> dict:
    """A config's fields that shape the model (names, paths and implementation choices left out)."""
    return {key: value for key, value in config.to_dict().items()
            if not key.startswith("_") and key not in ("name_or_path", "transformers_version", "dtype", "torch_dtype")}


def copy_weights(host, model) -> bool:
    """Copy `model`'s parameters and buffers into `host` in place, if both have the same class,
    architecture and tensor names and shapes; False (nothing copied) otherwise."""
    import torch

    if type(host) is not type(model) or _architecture(host.config) != _architecture(model.config):
        return False
    source, target = model.state_dict(), host.state_dict()
    if source.keys() != target.keys() or any(source[k].shape != target[k].shape for k in source):
        return False
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(source[name])
    return True
