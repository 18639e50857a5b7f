"""Benchmark items from jsonl files or lm-eval-harness task YAMLs with a local dataset.

jsonl item fields: id, group, kind, prompt and
  kind = "exact":  answer (string; the normalized greedy generation must equal it)
  kind = "choice": choices (list of continuations), label (index of the right one)
  kind = "code":   tests (Python run after prompt + generated completion; passing = exit 0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moegrok.jsonl import InvalidJSON, jsonl_records

KINDS = ("exact", "choice", "code")


class BenchmarkError(ValueError):
    """A malformed benchmark; the message names the file (and line)."""


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


def load_jsonl(path: Path) -> list[Item]:
    return [_item(record, where) for where, record in jsonl_records(path)]


def load_lm_eval_task(path: Path) -> list[Item]:
    """Items of an lm-eval task YAML (output_type multiple_choice or generate_until) whose
    dataset is a local file; the task's group is its `tag` (or its name)."""
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=str(path.parent), include_defaults=False)
    import yaml

    name = yaml.safe_load(path.read_text())["task"]
    task = task_manager.load_task_or_group([name])[name]
    docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
    group = name
    kind = {"multiple_choice": "choice", "generate_until": "exact"}.get(task.OUTPUT_TYPE)
    if kind is None:
        raise BenchmarkError(f"{path}: lm-eval output_type {task.OUTPUT_TYPE!r} is not supported")
    items = []
    for index, doc in enumerate(docs):
        prompt = task.doc_to_text(doc)
        target = task.doc_to_target(doc)
        if kind == "choice":
            choices = task.doc_to_choice(doc)
            label = target if isinstance(target, int) else choices.index(target)
            sep = task.config.target_delimiter
            items.append(Item(f"{name}-{index}", group, kind, prompt,
                              choices=[sep + c for c in choices], label=int(label)))
        else:
            answer = target if isinstance(target, str) else str(target)
            items.append(Item(f"{name}-{index}", group, kind, prompt, answer=answer))
    return items


def load_benchmark(path: str | Path) -> list[Item]:
    path = Path(path)
    if not path.exists():
        raise BenchmarkError(f"{path}: no such benchmark file")
    if path.suffix in (".yaml", ".yml"):
        items = load_lm_eval_task(path)
    elif path.suffix in (".jsonl", ".json"):
        items = load_jsonl(path)
    else:
        raise BenchmarkError(f"{path}: unsupported benchmark format {path.suffix!r} (jsonl or lm-eval YAML)")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise BenchmarkError(f"{path}: duplicate item ids")
    if not items:
        raise BenchmarkError(f"{path}: no items")
    return items
