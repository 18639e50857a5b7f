"""The sweep's sample shards: read, tokenized (with the first loadable checkpoint's tokenizer)
and fingerprinted, and remembered in samples.parquet, so a re-run whose sample files, sample
settings and tokenizer have not changed knows every shard's fingerprint without reading or
tokenizing anything (a sweep with nothing new then never imports transformers); the tokens
themselves are produced only when a record unit needs them. Planning writes nothing: the sweep
saves samples.parquet once every input has passed its checks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from moegrok.config import SweepConfig, as_plain
from moegrok.data.checkpoints import CheckpointRef, context_length
from moegrok.data.samples import (
    TokenizedSample,
    Truncation,
    select_samples,
    shard_samples,
    tokenize_samples,
    truncation_summary,
)
from moegrok.errors import SampleError
from moegrok.store import RunDir, as_path, failure_row, fingerprint, read_parquet, read_tags, write_parquet


@dataclass
class Shards:
    prints: list[str]  # per shard, a fingerprint of its samples' ids, groups and tokens
    members: list[list[tuple[str, str]]]  # per shard, (sample id, group) in order
    failures: list[dict]  # failure rows of the samples that were left out
    load: Callable[[], list[list[TokenizedSample]]]  # the tokenized shards (tokenizes at the first call)
    truncated: pd.DataFrame  # per group: samples cut to samples.max_tokens, tokens lost
    max_tokens: int  # the cut, samples.max_tokens or the model's context length
    pending: tuple[pd.DataFrame, dict] | None = field(default=None, repr=False)  # samples.parquet to write

    @property
    def groups(self) -> list[str]:
        return sorted({group for shard in self.members for _, group in shard})

    def save(self, run: RunDir) -> None:
        """Write samples.parquet when it does not hold these shards yet."""
        if self.pending is not None:
            table, tags = self.pending
            write_parquet(table, run.samples, tags=tags)
            self.pending = None


def tokens_fingerprint(shard: list[TokenizedSample]) -> str:
    return fingerprint([(s.sample_id, s.group, s.num_prompt_tokens, s.input_ids.tobytes().hex()) for s in shard])


def _tokenize(cfg: SweepConfig, tokenizer, max_tokens: int
              ) -> tuple[list[list[TokenizedSample]], list[str], list[Truncation]]:
    errors: list[str] = []
    truncated: list[Truncation] = []
    frame = select_samples(cfg.samples, errors=errors)
    shards = [tokenize_samples(part, tokenizer, max_tokens=max_tokens, errors=errors, truncated=truncated)
              for part in shard_samples(frame, shard_size=cfg.samples.shard_size)]
    if not any(shards):
        raise SampleError(f"samples.paths={cfg.samples.paths}: no usable sample"
                          + (f" ({len(errors)} rejected; first: {errors[0]})" if errors else ""))
    return shards, errors, truncated


def plan_shards(cfg: SweepConfig, run: RunDir, refs: list[CheckpointRef], tokenizer: Callable[[], object],
                checkpoint: Callable[[], Path]) -> Shards:
    """The sample shards, from samples.parquet when it holds them, else tokenized now (with
    `tokenizer()`, cut at samples.max_tokens or the context length of `checkpoint()`); a malformed
    or untokenizable sample is a failure row naming it, no usable sample at all a user error."""
    key = fingerprint(as_plain(cfg.samples), cfg.model.trust_remote_code, refs[0].name, refs[0].content,
                      [hashlib.sha256(as_path(path).read_bytes()).hexdigest() for path in cfg.samples.paths])
    cache: dict = {}
    tags = read_tags(run.samples)

    def max_tokens() -> int:
        if "max_tokens" not in cache:
            cache["max_tokens"] = cfg.samples.max_tokens or context_length(checkpoint(), tokenizer())
        return cache["max_tokens"]

    def load() -> list[list[TokenizedSample]]:
        if "shards" not in cache:
            cache["shards"], cache["errors"], cache["truncated"] = _tokenize(cfg, tokenizer(), max_tokens())
        return cache["shards"]

    pending = None
    if tags.get("samples") == key:  # current: nothing is read or tokenized
        table = read_parquet(run.samples, columns=["sample_id", "group", "shard"])
        members = [[] for _ in tags["prints"]]
        for sample_id, group, shard in table.itertuples(index=False):
            members[shard].append((sample_id, group))
    else:
        shards = load()
        members = [[(s.sample_id, s.group) for s in shard] for shard in shards]
        table = pd.DataFrame([{"sample_id": s.sample_id, "group": s.group, "num_tokens": len(s.input_ids),
                               "num_prompt_tokens": s.num_prompt_tokens, "shard": index}
                              for index, shard in enumerate(shards) for s in shard])
        tags = {"samples": key, "prints": [tokens_fingerprint(shard) for shard in shards],
                "rejected": cache["errors"], "max_tokens": max_tokens(),
                "truncated": truncation_summary(cache["truncated"]).to_dict("records")}
        pending = (table, tags)
    failures = [failure_row("samples", e.split(": ", 1)[0], SampleError.__name__, e, kind="record")
                for e in tags["rejected"]]
    truncated = pd.DataFrame(tags.get("truncated", []), columns=["group", "samples", "tokens_lost", "most_lost"])
    return Shards(tags["prints"], members, failures, load, truncated, tags.get("max_tokens", 0), pending)
