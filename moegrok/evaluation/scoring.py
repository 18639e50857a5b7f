"""Score benchmark items with an engine: exact match, multiple choice by log-likelihood,
code pass@1 in the sandbox. Item-level results and per-group accuracy tables."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from moegrok.evaluation.benchmarks import Item
from moegrok.evaluation.engines import Engine
from moegrok.evaluation.sandbox import run_python

ITEM_COLUMNS = ["id", "group", "kind", "prediction", "score", "score_norm"]


def normalize(text: str) -> str:
    """Lower-case, first line only, inner whitespace collapsed, outer punctuation dropped."""
    first_line = text.strip().split("\n", 1)[0] if text.strip() else ""
    return re.sub(r"\s+", " ", first_line).strip().strip(".").lower()


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize(prediction) == normalize(answer))


def code_passes(prompt: str, completion: str, tests: str, *, timeout_s: float) -> bool:
    """pass@1 of one greedy completion: prompt + completion + tests exits with status 0."""
    return run_python(prompt + completion + "\n\n" + tests, timeout_s=timeout_s).passed


def choose(logliks: list[float], choices: list[str]) -> tuple[int, int]:
    """(index by summed log-likelihood, index by log-likelihood per byte of the choice)."""
    per_byte = [ll / max(len(c.encode()), 1) for ll, c in zip(logliks, choices, strict=True)]
    return int(np.argmax(logliks)), int(np.argmax(per_byte))


def score_items(engine: Engine, items: list[Item], *, max_new_tokens: int, code_timeout_s: float) -> pd.DataFrame:
    """One row per item: id, group, kind, prediction, score (0/1), score_norm (choice items:
    the length-normalized choice; others: = score)."""
    tokenizer = engine.tokenizer
    rows: dict[str, dict] = {}

    generated = [item for item in items if item.kind in ("exact", "code")]
    if generated:
        prompt_ids = [tokenizer(item.prompt)["input_ids"] for item in generated]
        outputs = engine.generate(prompt_ids, max_new_tokens=max_new_tokens)
        for item, tokens in zip(generated, outputs, strict=True):
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if item.kind == "exact":
                score = exact_match(text, item.answer)
            else:
                score = float(code_passes(item.prompt, text, item.tests, timeout_s=code_timeout_s))
            rows[item.id] = {"prediction": text, "score": score, "score_norm": score}

    choice_items = [item for item in items if item.kind == "choice"]
    if choice_items:
        requests, owners = [], []
        for item in choice_items:
            context = tokenizer(item.prompt)["input_ids"]
            for choice in item.choices:
                requests.append((context, tokenizer(choice, add_special_tokens=False)["input_ids"]))
                owners.append(item.id)
        logliks = [ll for ll, _ in engine.loglikelihood(requests)]
        cursor = 0
        for item in choice_items:
            scores = logliks[cursor : cursor + len(item.choices)]
            cursor += len(item.choices)
            best, best_norm = choose(scores, item.choices)
            rows[item.id] = {"prediction": item.choices[best], "score": float(best == item.label),
                             "score_norm": float(best_norm == item.label)}

    return pd.DataFrame(
        [{"id": item.id, "group": item.group, "kind": item.kind, **rows[item.id]} for item in items],
        columns=ITEM_COLUMNS,
    )


def accuracy_rows(scored: pd.DataFrame, *, checkpoint: str, step: int, benchmark: str) -> pd.DataFrame:
    """Per group accuracy of one checkpoint on one benchmark."""
    grouped = scored.groupby("group", sort=True)
    return pd.DataFrame(
        {
            "checkpoint": checkpoint,
            "step": step,
            "benchmark": benchmark,
            "group": list(grouped.groups),
            "accuracy": grouped["score"].mean().to_numpy(),
            "accuracy_norm": grouped["score_norm"].mean().to_numpy(),
            "n": grouped.size().to_numpy(),
        }
    )
