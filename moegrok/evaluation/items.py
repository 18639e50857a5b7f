"""Benchmark items from moegrok's jsonl files or lm-eval-harness task YAMLs with a local dataset.

moegrok jsonl item fields: id, group, kind, prompt and (scored by moegrok's rules, see scoring.py)
  kind = "exact":  answer (string; the normalized greedy generation must equal it)
  kind = "choice": choices (list of continuations), label (index of the right one)
  kind = "code":   tests (Python run after prompt + generated completion; passing = exit 0)
An lm-eval task YAML gives `LmEvalItem`s, scored as lm-eval scores them (see lm_eval_tasks.py).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from moegrok.data.jsonl import InvalidJSON, jsonl_records
from moegrok.errors import BenchmarkError
from moegrok.store import ObjectPath, as_path

if TYPE_CHECKING:
    from moegrok.evaluation.lm_eval_tasks import LmEvalItem

KINDS = ("exact", "choice", "code")


@dataclass(frozen=True)
class Item:
    id: str
    group: str
    kind: str
    prompt: str
    answer: str = ""
    choices: list[str] = field(default_factory=list)
    label: int = -1
    tests: str = ""


def _item(record: object, where: str) -> Item:
    if isinstance(record, InvalidJSON):
        raise BenchmarkError(f"{where}: {record}")
    if not isinstance(record, dict):
        raise BenchmarkError(f"{where}: expected a JSON object")
    kind = record.get("kind")
    if kind not in KINDS:
        raise BenchmarkError(f"{where}: kind={kind!r}, expected one of {KINDS}")
    for key in ("id", "group", "prompt"):
        if not isinstance(record.get(key), str | int) or record.get(key) == "":
            raise BenchmarkError(f"{where}: missing or empty {key!r}")
    item = Item(str(record["id"]), str(record["group"]), kind, str(record["prompt"]),
                answer=str(record.get("answer", "")), choices=list(record.get("choices") or []),
                label=int(record.get("label", -1)), tests=str(record.get("tests", "")))
    if kind == "exact" and "answer" not in record:
        raise BenchmarkError(f"{where}: an exact item needs 'answer'")
    if kind == "choice" and not (len(item.choices) >= 2 and 0 <= item.label < len(item.choices)):
        raise BenchmarkError(f"{where}: a choice item needs >= 2 'choices' and a 'label' indexing them")
    if kind == "code" and not item.tests:
        raise BenchmarkError(f"{where}: a code item needs 'tests'")
    return item


def load_jsonl(path: Path, *, errors: list[str] | None = None) -> list[Item]:
    """Items of a moegrok jsonl file. A malformed line raises a BenchmarkError naming file:line, or,
    when `errors` is a list, is left out and its message appended there."""
    items = []
    for where, record in jsonl_records(path):
        try:
            items.append(_item(record, where))
        except BenchmarkError as e:
            if errors is None:
                raise
            errors.append(str(e))
    return items


def load_benchmark(path: str | Path, *, group_field: str | None = None, id_field: str = "id",
                   errors: list[str] | None = None) -> list[Item] | list[LmEvalItem]:
    """Items of a jsonl file or an lm-eval task YAML (`group_field`, `id_field`: lm-eval only,
    the document fields that name an item's group and id; `errors`: see `load_jsonl`)."""
    path = as_path(path)
    if not path.exists():
        raise BenchmarkError(f"{path}: no such benchmark file")
    if path.suffix in (".yaml", ".yml") and isinstance(path, ObjectPath):
        raise BenchmarkError(f"{path}: an lm-eval task YAML is read from a local path (its data files are local); "
                             "a jsonl benchmark may be a URL")
    if path.suffix in (".yaml", ".yml"):
        from moegrok.evaluation.lm_eval_tasks import load_lm_eval_task

        items = load_lm_eval_task(path, group_field=group_field, id_field=id_field)
    elif path.suffix in (".jsonl", ".json"):
        items = load_jsonl(path, errors=errors)
    else:
        raise BenchmarkError(f"{path}: unsupported benchmark format {path.suffix!r} (jsonl or lm-eval YAML)")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        repeated = sorted(i for i, count in Counter(ids).items() if count > 1)
        raise BenchmarkError(f"{path}: duplicate item ids {repeated[:5]}")
    if not items:
        raise BenchmarkError(f"{path}: no items")
    return items


class _TolerantLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs, whose `!function` tags name Python code: kept as their text."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {getattr(node, 'value', '')}")


def _named_files(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [f for v in value for f in _named_files(v)]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _named_files(v)]
    return []


def content_digest(path: str | Path) -> str:
    """A hash of what a benchmark's items come from: the file and, for an lm-eval task YAML, the
    local data files its `dataset_kwargs.data_files` names (so an edited data file re-scores)."""
    path = as_path(path)
    digest = hashlib.sha256(path.read_bytes())
    if path.suffix in (".yaml", ".yml"):
        task = yaml.load(path.read_text(), Loader=_TolerantLoader) or {}
        for name in sorted(_named_files((task.get("dataset_kwargs") or {}).get("data_files"))):
            data = Path(name)
            digest.update(name.encode())
            digest.update(data.read_bytes() if data.is_file() else b"(missing)")
    return digest.hexdigest()

