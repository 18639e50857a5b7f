"""Training-sample sources, tokenization and sharding.

A source is a jsonl or Parquet file whose records carry `id`, `group`, and either `text` or
`prompt` + `completion`. The loss of a `text` sample is scored on every token after the first;
the loss of a prompt/completion sample on the completion only.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moegrok.config import SamplesConfig
from moegrok.data.jsonl import InvalidJSON, jsonl_records
from moegrok.errors import SampleError
from moegrok.store import as_path, read_parquet


def _check_record(record: object, where: str) -> dict:
    if isinstance(record, InvalidJSON):
        raise SampleError(f"{where}: {record}")
    if not isinstance(record, dict):
        raise SampleError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("id", "group"):
        if not isinstance(record.get(key), str | int) or record.get(key) == "":
            raise SampleError(f"{where}: missing or empty {key!r}")
    has_text = isinstance(record.get("text"), str)
    has_pair = isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str)
    if has_text == has_pair:
        raise SampleError(f"{where}: needs either a string 'text' or string 'prompt' and 'completion'")
    return {
        "id": str(record["id"]),
        "group": str(record["group"]),
        "text": record.get("text"),
        "prompt": record.get("prompt"),
        "completion": record.get("completion"),
        "where": where,
    }


def read_samples(path: str | Path, *, errors: list[str] | None = None) -> pd.DataFrame:
    """Read one source into columns id, group, text, prompt, completion (None where absent) and
    where (file:line).

    A malformed record raises a SampleError naming file:line, or, when `errors` is a list, is
    skipped and its message appended there (a sweep records it and goes on)."""

    def checked(record: object, where: str) -> dict | None:
        try:
            return _check_record(record, where)
        except SampleError as e:
            if errors is None:
                raise
            errors.append(str(e))
            return None

    path = as_path(path)
    if not path.exists():
        raise SampleError(f"{path}: no such sample file")
    if path.suffix == ".parquet":
        frame = read_parquet(path)
        records = [
            checked({k: v for k, v in r.items() if v is not None and v == v}, f"{path}:row {i}")
            for i, r in enumerate(frame.to_dict("records"))
        ]
    elif path.suffix in (".jsonl", ".json"):
        records = [checked(record, where) for where, record in jsonl_records(path)]
    else:
        raise SampleError(f"{path}: unsupported sample format {path.suffix!r} (use .jsonl or .parquet)")
    records = [r for r in records if r is not None]
    frame = pd.DataFrame.from_records(records, columns=["id", "group", "text", "prompt", "completion", "where"])
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        raise SampleError(f"{path}: duplicate sample id {duplicated.iloc[0]!r}")
    return frame


def select_samples(cfg: SamplesConfig, *, errors: list[str] | None = None) -> pd.DataFrame:
    """Read every source, keep the configured groups, subsample each group deterministically."""
    if not cfg.paths:
        raise SampleError("samples.paths is empty: give at least one jsonl/parquet sample file")
    frame = pd.concat([read_samples(p, errors=errors) for p in cfg.paths], ignore_index=True)
    if frame.empty:
        first = f"; first: {errors[0]}" if errors else ""
        raise SampleError(f"samples.paths={cfg.paths}: no valid sample ({len(errors or [])} rejected{first})")
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        raise SampleError(f"sample id {duplicated.iloc[0]!r} appears in more than one of {cfg.paths}")
    if cfg.groups:
        unknown = sorted(set(cfg.groups) - set(frame["group"]))
        if unknown:
            raise SampleError(f"samples.groups: no samples of group(s) {unknown} in {cfg.paths}")
        frame = frame[frame["group"].isin(cfg.groups)]
    parts = []
    for group, part in frame.groupby("group", sort=True):
        if cfg.max_per_group and len(part) > cfg.max_per_group:
            seed = [cfg.seed, zlib.crc32(str(group).encode())]
            keep = np.sort(np.random.default_rng(seed).choice(len(part), cfg.max_per_group, replace=False))
            part = part.iloc[keep]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


@dataclass(frozen=True)
class TokenizedSample:
    sample_id: str
    group: str
    input_ids: np.ndarray  # int64, (T,)
    num_prompt_tokens: int  # index of the first scored token (>= 1)


@dataclass(frozen=True)
class Truncation:
    """A sample longer than samples.max_tokens, cut to it."""

    sample_id: str
    group: str
    num_tokens: int  # before the cut
    num_lost: int


def tokenize_samples(frame: pd.DataFrame, tokenizer, *, max_tokens: int, errors: list[str] | None = None,
                     truncated: list[Truncation] | None = None) -> list[TokenizedSample]:
    """Tokenize with the tokenizer's special tokens; prompt and completion separately (as lm-eval
    does), so the completion's tokens are exactly the scored ones. Text longer than `max_tokens`
    keeps its start; a prompt/completion keeps its end (the completion); every cut is appended to
    `truncated` when it is a list. A sample with nothing to score (text of fewer than 2 tokens, an
    empty completion) raises a SampleError, or, when `errors` is a list, is left out and its message
    appended there."""
    out = []
    for row in frame.itertuples(index=False):
        if isinstance(row.text, str):
            whole = tokenizer(row.text)["input_ids"]
            ids, num_prompt = whole[:max_tokens], 1
            problem = "it has fewer than 2 tokens" if len(ids) < 2 else None
        else:
            prompt = tokenizer(row.prompt)["input_ids"]
            completion = tokenizer(row.completion, add_special_tokens=False)["input_ids"]
            whole = prompt + completion
            ids = whole[-max_tokens:]
            num_prompt = max(len(ids) - len(completion), 1)
            problem = ("its completion is empty" if not completion
                       else "it has fewer than 2 tokens" if len(ids) < 2 else None)
        if problem is not None:
            where = getattr(row, "where", None) or f"sample {row.id!r}"
            error = SampleError(f"{where}: sample {row.id!r} has nothing to score: {problem}")
            if errors is None:
                raise error
            errors.append(str(error))
            continue
        if truncated is not None and len(whole) > len(ids):
            truncated.append(Truncation(row.id, row.group, len(whole), len(whole) - len(ids)))
        out.append(TokenizedSample(row.id, row.group, np.asarray(ids, dtype=np.int64), num_prompt))
    return out


def truncation_summary(truncated: list[Truncation]) -> pd.DataFrame:
    """Per group: how many samples were cut and how many tokens they lost (total, most)."""
    frame = pd.DataFrame(truncated, columns=["sample_id", "group", "num_tokens", "num_lost"])
    return (frame.groupby("group", sort=True)["num_lost"].agg(samples="size", tokens_lost="sum", most_lost="max")
            .reset_index())


def shard_samples(frame: pd.DataFrame, *, shard_size: int) -> list[pd.DataFrame]:
    """Fixed shards in the frame's order; the same samples always land in the same shard."""
    return [frame.iloc[i : i + shard_size] for i in range(0, len(frame), shard_size)]
