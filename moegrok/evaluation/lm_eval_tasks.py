"""lm-eval-harness tasks (a task YAML with a local dataset) scored as lm-eval scores them.

lm-eval's own task object builds every request: description, few-shot examples (drawn with the
seed `lm_eval` uses, 1234), target delimiter, `generation_kwargs` (`until`, `max_gen_toks`, 256
when unset). Text becomes token ids by the rules of lm-eval's HF model (`lm_eval --model hf`), so
both engines see the ids it would see, left-truncated to the model's length as it does. After the
engine ran the requests, the task's `filter_list` and `process_results` give every metric of its
`metric_list` (acc, acc_norm, exact_match with its options, ...) by lm-eval's own definitions.

Supported: output_type multiple_choice and generate_until, greedy decoding, one response per
request, metrics that lm-eval averages over items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from moegrok.errors import BenchmarkError

OUTPUT_TYPES = ("multiple_choice", "generate_until")
FEWSHOT_SEED = 1234  # lm_eval's default fewshot_random_seed


@dataclass(frozen=True)
class LmEvalItem:
    """One document of an lm-eval task and the requests lm-eval built for it. The task is loaded
    again from `task_path` where the item is scored, so the YAML and its data files must be readable
    there at the same path."""

    id: str
    group: str
    kind: str  # the task's output_type
    prompt: str  # the context of the first request
    task_path: str
    doc: dict = field(repr=False)
    # multiple_choice: (context, continuation) per loglikelihood request, the choices first
    requests: tuple[tuple[str, str], ...] = ()
    choices: tuple[str, ...] = ()  # multiple_choice: the choices, for the prediction column
    until: tuple[str, ...] = ()  # generate_until: stop strings
    max_gen_toks: int = 0  # generate_until


@lru_cache(maxsize=16)
def _cached_task(path: str, text: str):
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=str(Path(path).parent), include_defaults=False).load(path)
    if loaded["groups"] or len(loaded["tasks"]) != 1:
        raise BenchmarkError(f"{path}: holds {sorted(loaded['tasks'])}; give one lm-eval task per benchmark file")
    (task,) = loaded["tasks"].values()
    if task.get_config("num_fewshot") is None:  # as lm_eval: no num_fewshot means zero-shot
        task.set_config(key="num_fewshot", value=0)
    return task


def load_task(path: Path):
    """lm-eval's task object of a YAML file (cached per file content), checked to be scorable."""
    from lm_eval.api.metrics import mean

    task = _cached_task(str(path), path.read_text())
    if task.OUTPUT_TYPE not in OUTPUT_TYPES:
        raise BenchmarkError(f"{path}: output_type {task.OUTPUT_TYPE!r} is not supported, only {OUTPUT_TYPES}")
    not_mean = [name for name, aggregate in task.aggregation().items() if aggregate is not mean]
    if not_mean:
        raise BenchmarkError(f"{path}: metrics {not_mean} are not averaged over items; moegrok scores per item")
    if (repeats := task.get_config("repeats")) not in (None, 1):
        raise BenchmarkError(f"{path}: repeats={repeats}; moegrok makes one greedy response per request")
    return task


def load_lm_eval_task(path: Path, *, group_field: str | None = None, id_field: str = "id") -> list[LmEvalItem]:
    """One item per document with the requests lm-eval's task builds. Group: the document's
    `group_field` if given, else the task's first `tag`, else its name. Id: the document's
    `id_field` where it has one, else its index."""
    task = load_task(path)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)  # the same few-shot draws on every load
    task.build_all_requests()
    by_doc: dict[int, list] = {}
    for instance in task.instances:
        by_doc.setdefault(instance.doc_id, []).append(instance)
    tag = _first_tag(path)
    task_group = tag or task.task_name
    items = []
    for doc_id, instances in by_doc.items():
        doc = dict(instances[0].doc)
        if group_field is not None and group_field not in doc:
            raise BenchmarkError(f"{path}: document {doc_id} has no group_field {group_field!r}")
        group = str(doc[group_field]) if group_field else task_group
        items.append(_item(task, path, sorted(instances, key=lambda i: i.idx), id=str(doc.get(id_field, doc_id)),
                           group=group, doc=doc))
    return items


def _first_tag(path: Path) -> str | None:
    """The first of the YAML's tags (lm-eval keeps them in its task index as a set, not on the task)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    tag = load_yaml(path, resolve_func=False).get("tag")
    return (tag if isinstance(tag, str) else tag[0]) if tag else None


def _item(task, path: Path, instances: list, **common) -> LmEvalItem:
    from lm_eval.models.utils import normalize_gen_kwargs

    common |= dict(kind=task.OUTPUT_TYPE, prompt=instances[0].arguments[0], task_path=str(path))
    if task.OUTPUT_TYPE == "multiple_choice":
        return LmEvalItem(**common, requests=tuple(tuple(i.arguments) for i in instances),
                          choices=tuple(task.doc_to_choice(common["doc"])))
    gen_kwargs = normalize_gen_kwargs(instances[0].arguments[1], default_max_gen_toks=256)  # lm-eval HF's default
    if gen_kwargs["do_sample"]:
        raise BenchmarkError(f"{path}: generation_kwargs ask for sampling; moegrok decodes greedily")
    return LmEvalItem(**common, until=tuple(gen_kwargs["until"]), max_gen_toks=gen_kwargs["max_gen_toks"])


def lm_eval_results(item: LmEvalItem, responses: list) -> tuple[str, dict[str, float]]:
    """(prediction, {"metric,filter": value}) from the engine's responses to the item's requests:
    (loglikelihood, is_greedy) per choice, or the generated text cut at the stop strings."""
    from lm_eval.api.instance import Instance

    task = load_task(Path(item.task_path))
    request_type = "loglikelihood" if item.kind == "multiple_choice" else "generate_until"
    arguments = item.requests if item.kind == "multiple_choice" else [(item.prompt, {"until": list(item.until)})]
    instances = [Instance(request_type, item.doc, args, idx, metadata=(task.task_name, 0, 1), resps=[response])
                 for idx, (args, response) in enumerate(zip(arguments, responses, strict=True))]
    for ensemble in task._filters:  # what task.apply_filters runs, here on this item's instances only
        ensemble.apply(instances)
    metrics = {}
    for filter_name in instances[0].filtered_resps:
        values = task.process_results(item.doc, [instance.filtered_resps[filter_name] for instance in instances])
        for name, value in values.items():
            if not isinstance(value, int | float | np.number):
                raise TypeError(f"metric {name!r} gave {value!r}, not a number")
            metrics[f"{name},{filter_name}"] = float(value)
    if item.kind == "multiple_choice":
        prediction = item.choices[int(np.argmax([ll for ll, _ in responses[: len(item.choices)]]))]
    else:
        prediction = str(next(iter(instances[0].filtered_resps.values())))
    return prediction, metrics


def primary_scores(item: LmEvalItem, metrics: dict[str, float]) -> tuple[float, float]:
    """(score, score_norm): the first metric of the task's metric_list under its first filter;
    acc_norm under that filter where the task computes it, else the score again."""
    task = load_task(Path(item.task_path))
    first_filter = next(iter(metrics)).split(",", 1)[1]
    score = metrics[f"{next(iter(task.aggregation()))},{first_filter}"]
    return score, metrics.get(f"acc_norm,{first_filter}", score)
