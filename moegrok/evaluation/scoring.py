"""Score benchmark items with an engine; item-level results and per-group accuracy tables.

Every item is scored on its own: an item whose requests the engine rejects or whose scorer raises
gets score NaN and the message in `error`; all other items are scored.

moegrok's jsonl kinds follow moegrok's own rules:
  exact:  the greedy generation (at most `max_new_tokens`; by default the longest tokenized answer of the
          benchmark + 4 tokens) equals the answer after `normalize`
          of both (first line, whitespace collapsed, outer "." dropped, lower-cased)
  choice: score: the choice with the highest summed log-likelihood is the label; score_norm: the
          choice with the highest log-likelihood per UTF-8 byte of its continuation is
  code:   pass@1: prompt + greedy completion + tests exits with status 0 in the sandbox
lm-eval tasks (kinds multiple_choice, generate_until) are scored as lm-eval scores them (see
lm_eval_tasks.py): `metrics` holds each "metric,filter" value, score is the first metric of the
task's metric_list, score_norm its acc_norm (else the score).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from moegrok.evaluation.items import Item
from moegrok.evaluation.lm_eval_tasks import LmEvalItem, lm_eval_results, primary_scores
from moegrok.evaluation.sandbox import run_python, sandbox_guarantees

if TYPE_CHECKING:  # the engines need torch; the driver, which only reads scored tables, does not
    from moegrok.evaluation.engines import Engine, Tokens

ITEM_COLUMNS = ["id", "group", "kind", "prediction", "score", "score_norm", "error", "metrics", "unisolated"]
SCORING_VERSION = 2  # part of every evaluation unit's fingerprint: raise it when scoring rules change
LM_EVAL_KINDS = ("multiple_choice", "generate_until")


def normalize(text: str) -> str:
    """Lower-case, first line only, inner whitespace collapsed, outer punctuation dropped."""
    first_line = text.strip().split("\n", 1)[0] if text.strip() else ""
    return re.sub(r"\s+", " ", first_line).strip().strip(".").lower()


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize(prediction) == normalize(answer))


def code_passes(prompt: str, completion: str, tests: str, *, timeout_s: float, unisolated: bool = False) -> bool:
    """pass@1 of one greedy completion: prompt + completion + tests exits with status 0 in the
    sandbox (without isolation only if `unisolated`)."""
    return run_python(prompt + completion + "\n\n" + tests, timeout_s=timeout_s, unisolated=unisolated).passed


def choose(logliks: list[float], choices: list[str]) -> tuple[int, int]:
    """(index by summed log-likelihood, index by log-likelihood per byte of the choice)."""
    per_byte = [ll / max(len(c.encode()), 1) for ll, c in zip(logliks, choices, strict=True)]
    return int(np.argmax(logliks)), int(np.argmax(per_byte))


@dataclass
class TokenRequests:
    """What the engine runs for one item: log-likelihood pairs, or one greedy generation."""

    pairs: list[tuple[Tokens, Tokens]] = field(default_factory=list)
    prompt: Tokens | None = None
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 0


ANSWER_SLACK = 4  # generated tokens beyond the longest exact answer (a trailing "." or space, say)
CODE_MAX_NEW_TOKENS = 256  # a code item's completion when eval.max_new_tokens is null


def answer_length(answer: str, tokenizer) -> int:
    """Tokens of an exact answer as a continuation (after a space, as generations start)."""
    return len(tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"])


def generation_lengths(items: list[Item | LmEvalItem], tokenizer, *, max_new_tokens: int | None) -> dict[str, int]:
    """Greedy generation length per moegrok item kind: `max_new_tokens` when set, else the longest
    tokenized exact answer + ANSWER_SLACK for exact items and CODE_MAX_NEW_TOKENS for code items."""
    if max_new_tokens is not None:
        return {"exact": max_new_tokens, "code": max_new_tokens}
    answers = [answer_length(item.answer, tokenizer) for item in items if item.kind == "exact"]
    return {"exact": max(answers, default=1) + ANSWER_SLACK, "code": CODE_MAX_NEW_TOKENS}


def longest_answer(items: list[Item | LmEvalItem], tokenizer) -> tuple[str, int] | None:
    """(item id, tokens) of the exact item with the longest tokenized answer; None without one."""
    lengths = [(item.id, answer_length(item.answer, tokenizer)) for item in items if item.kind == "exact"]
    return max(lengths, key=lambda pair: pair[1], default=None)


def token_requests(item: Item | LmEvalItem, engine: Engine, *, lm_eval_tokens,
                   max_new_tokens: dict[str, int]) -> TokenRequests:
    tokenizer = engine.tokenizer
    if item.kind in ("exact", "code"):
        return TokenRequests(prompt=tokenizer(item.prompt)["input_ids"], max_new_tokens=max_new_tokens[item.kind])
    if item.kind == "choice":
        context = tokenizer(item.prompt)["input_ids"]
        return TokenRequests(pairs=[(context, tokenizer(c, add_special_tokens=False)["input_ids"])
                                    for c in item.choices])
    if item.kind == "multiple_choice":
        if not item.requests:
            raise ValueError("the document has no choices")
        return TokenRequests(pairs=[lm_eval_tokens.pair(context, continuation, max_length=engine.max_length)
                                    for context, continuation in item.requests])
    if item.kind == "generate_until":
        prompt = lm_eval_tokens.generation_prompt(item.prompt, max_gen_toks=item.max_gen_toks,
                                                  max_length=engine.max_length)
        return TokenRequests(prompt=prompt, stop=lm_eval_tokens.stop_strings(item.until),
                             max_new_tokens=item.max_gen_toks)
    raise ValueError(f"kind={item.kind!r} is not a benchmark item kind")


def run_isolated(run: Callable[[list], list], inputs: dict[int, list]) -> dict[int, list | Exception]:
    """`run` over every item's inputs at once, split back per item; if that raises, item by item,
    so an input the engine rejects fails only its own item."""
    if not inputs:
        return {}
    try:
        outputs = run([x for xs in inputs.values() for x in xs])
    except Exception:
        return {key: _run_one(run, xs) for key, xs in inputs.items()}
    split, cursor = {}, 0
    for key, xs in inputs.items():
        split[key] = outputs[cursor : cursor + len(xs)]
        cursor += len(xs)
    return split


def _run_one(run: Callable[[list], list], inputs: list) -> list | Exception:
    try:
        return run(inputs)
    except Exception as e:
        return e


def run_requests(engine: Engine, requests: dict[int, TokenRequests]) -> dict[int, list | Exception]:
    """Per item: (log-likelihood, is_greedy) per pair, or [generated tokens]; or the exception."""
    responses = run_isolated(engine.loglikelihood, {i: r.pairs for i, r in requests.items() if r.pairs})
    generations: dict[tuple, dict[int, list]] = defaultdict(dict)
    for i, r in requests.items():
        if r.prompt is not None:
            generations[r.stop, r.max_new_tokens][i] = [r.prompt]
    for (stop, max_new_tokens), prompts in generations.items():
        responses |= run_isolated(partial(engine.generate, max_new_tokens=max_new_tokens, stop=stop), prompts)
    return responses


def item_scores(item: Item | LmEvalItem, requests: TokenRequests, responses: list, *, tokenizer, lm_eval_tokens,
                code_timeout_s: float, unisolated: bool = False) -> dict:
    """prediction, score, score_norm, metrics of one item from the engine's responses."""
    if item.kind == "choice":
        best, best_norm = choose([ll for ll, _ in responses], item.choices)
        return {"prediction": item.choices[best], "score": float(best == item.label),
                "score_norm": float(best_norm == item.label), "metrics": "{}"}
    if item.kind in ("exact", "code"):
        text = tokenizer.decode(responses[0], skip_special_tokens=True)
        if item.kind == "exact":
            score = exact_match(text, item.answer)
        else:
            score = float(code_passes(item.prompt, text, item.tests, timeout_s=code_timeout_s, unisolated=unisolated))
        return {"prediction": text, "score": score, "score_norm": score, "metrics": "{}"}
    if item.kind == "generate_until":
        responses = [lm_eval_tokens.generated_text(responses[0], requests.stop)]
    prediction, metrics = lm_eval_results(item, responses)
    score, score_norm = primary_scores(item, metrics)
    return {"prediction": prediction, "score": score, "score_norm": score_norm, "metrics": json.dumps(metrics)}


def score_items(engine: Engine, items: list[Item | LmEvalItem], *, max_new_tokens: int | None,
                code_timeout_s: float, unisolated: bool = False) -> pd.DataFrame:
    """One row per item (ITEM_COLUMNS): score 0/1 (lm-eval: its metric's value), score_norm
    (choice: the length-normalized choice; others: = score), error (missing, or why the item has
    no score), metrics (lm-eval items: JSON of every "metric,filter" value, else "{}"), unisolated
    (a code item whose program ran without the sandbox's isolation, allowed by `unisolated`).
    `max_new_tokens`: the generation length of exact and code items (None: `generation_lengths`)."""
    without_isolation = (unisolated and any(item.kind == "code" for item in items)
                         and bool(sandbox_guarantees().fallback))
    lm_eval_tokens = None
    if any(item.kind in LM_EVAL_KINDS for item in items):
        from moegrok.evaluation.lm_eval_tokens import HFTokenization

        lm_eval_tokens = HFTokenization(engine.tokenizer)
    rows = [{"id": item.id, "group": item.group, "kind": item.kind, "prediction": "", "score": np.nan,
             "score_norm": np.nan, "error": None, "metrics": "{}",
             "unisolated": without_isolation and item.kind == "code"} for item in items]
    lengths = generation_lengths(items, engine.tokenizer, max_new_tokens=max_new_tokens)
    requests: dict[int, TokenRequests] = {}
    for i, item in enumerate(items):
        try:
            requests[i] = token_requests(item, engine, lm_eval_tokens=lm_eval_tokens, max_new_tokens=lengths)
        except Exception as e:
            rows[i]["error"] = _message(e)
    for i, responses in run_requests(engine, requests).items():
        try:
            if isinstance(responses, Exception):
                raise responses
            rows[i] |= item_scores(items[i], requests[i], responses, tokenizer=engine.tokenizer,
                                   lm_eval_tokens=lm_eval_tokens, code_timeout_s=code_timeout_s,
                                   unisolated=unisolated)
        except Exception as e:
            rows[i]["error"] = _message(e)
    return pd.DataFrame(rows, columns=ITEM_COLUMNS).astype({"error": "str"})  # missing where scored


def _message(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def accuracy_rows(scored: pd.DataFrame, *, checkpoint: str, step: int, benchmark: str) -> pd.DataFrame:
    """Per group accuracy of one checkpoint on one benchmark over the items without an error:
    accuracy, accuracy_norm, n (items scored), num_errors (items left out for an error),
    unisolated (code items whose programs ran without isolation)."""
    errored = scored["error"].notna() if "error" in scored else pd.Series(False, index=scored.index)
    unisolated = scored["unisolated"].astype(bool) if "unisolated" in scored else pd.Series(False, index=scored.index)
    grouped = scored.assign(scored=~errored, errored=errored, unisolated=unisolated).groupby("group", sort=True)
    return pd.DataFrame(
        {
            "checkpoint": checkpoint,
            "step": step,
            "benchmark": benchmark,
            "group": list(grouped.groups),
            "accuracy": grouped["score"].mean().to_numpy(),  # mean skips the errored items' NaN
            "accuracy_norm": grouped["score_norm"].mean().to_numpy(),
            "n": grouped["scored"].sum().to_numpy(),
            "num_errors": grouped["errored"].sum().to_numpy(),
            "unisolated": grouped["unisolated"].sum().to_numpy(),
        }
    )
