"""The sweep's sample shards: read, tokenized (with the first loadable checkpoint's tokenizer)
and fingerprinted, and remembered in samples.parquet, so a re-run whose sample files, sample
settings and tokenizer have not changed knows every shard's fingerprint without reading or
tokenizing anything (a sweep with nothing new then never imports transformers); the tokens
themselves are produced only when a record unit needs them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from moegrok.config import SweepConfig, as_plain
from moegrok.data.checkpoints import CheckpointRef, local_path
from moegrok.data.samples import TokenizedSample, select_samples, shard_samples, tokenize_samples
from moegrok.errors import CheckpointError, SampleError
from moegrok.store import RunDir, failure_row, fingerprint, read_tags, write_parquet


@dataclass
class Shards:
    prints: list[str]  # per shard, a fingerprint of its samples' ids, groups and tokens
    members: list[list[tuple[str, str]]]  # per shard, (sample id, group) in order
    failures: list[dict]  # failure rows of the samples that were left out
    load: Callable[[], list[list[TokenizedSample]]]  # the tokenized shards (tokenizes at the first call)


def tokens_fingerprint(shard: list[TokenizedSample]) -> str:
    return fingerprint([(s.sample_id, s.group, s.num_prompt_tokens, s.input_ids.tobytes().hex()) for s in shard])


def _tokenize(cfg: SweepConfig, refs: list[CheckpointRef]) -> tuple[list[list[TokenizedSample]], list[str]]:
    from transformers import AutoTokenizer

    errors: list[str] = []
    frame = select_samples(cfg.samples, errors=errors)
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
    shards = [tokenize_samples(part, tokenizer, max_tokens=cfg.samples.max_tokens, errors=errors)
              for part in shard_samples(frame, shard_size=cfg.samples.shard_size)]
    if not any(shards):
        raise SampleError(f"samples.paths={cfg.samples.paths}: no usable sample"
                          + (f" ({len(errors)} rejected; first: {errors[0]})" if errors else ""))
    return shards, errors


def prepare_shards(cfg: SweepConfig, run: RunDir, refs: list[CheckpointRef]) -> Shards:
    """The sample shards; a malformed or untokenizable sample is a failure row naming it, no
    usable sample at all a user error."""
    key = fingerprint(as_plain(cfg.samples), cfg.model.trust_remote_code, refs[0].name, refs[0].content,
                      [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in cfg.samples.paths])
    cache: dict = {}

    def load() -> list[list[TokenizedSample]]:
        if "shards" not in cache:
            cache["shards"], cache["errors"] = _tokenize(cfg, refs)
        return cache["shards"]

    tags = read_tags(run.samples)
    if tags.get("samples") != key:
        shards = load()
        table = pd.DataFrame([{"sample_id": s.sample_id, "group": s.group, "num_tokens": len(s.input_ids),
                               "num_prompt_tokens": s.num_prompt_tokens, "shard": index}
                              for index, shard in enumerate(shards) for s in shard])
        tags = {"samples": key, "prints": [tokens_fingerprint(shard) for shard in shards],
                "rejected": cache["errors"]}
        write_parquet(table, run.samples, tags=tags)
    table = pd.read_parquet(run.samples, columns=["sample_id", "group", "shard"])
    members = [[] for _ in tags["prints"]]
    for sample_id, group, shard in table.itertuples(index=False):
        members[shard].append((sample_id, group))
    failures = [failure_row("samples", e.split(": ", 1)[0], SampleError.__name__, e) for e in tags["rejected"]]
    return Shards(tags["prints"], members, failures, load)
