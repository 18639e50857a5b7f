"""Multi-group modular arithmetic over a prime p, written as text ("12 + 5 =" -> "17").

Each group is one operation with its own train fraction, so groups memorize together but
generalize (grok) at different steps. The train split is the monitored sample set; the
held-out split is the benchmark.

Forms (`data.form`): `plain` writes one step, "a + b =" -> c. `chain` writes three steps of the
group's operation with the intermediate results given, "a + b = x ; b + x = y ; x + y =" -> z
(18 tokens with BOS and answer): long samples over which a pathway has room to change.

A `canary` group keeps its op's prompts but answers each with a random residue, fixed per sample
and drawn with `data.seed`: the model can memorize it and can never generalize it, so it is a
control known before training (no held-out accuracy needed to choose it). Give it an op no other
group has: on another group's prompts its random answers contradict that group's, and neither
memorizes (with the canary on `add`'s prompts, both stayed at train accuracy ~0.72).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moegrok.config import ToyDataConfig, ToyForm, ToyOperation


@dataclass(frozen=True)
class Operation:
    template: str  # prompt text with {a} and {b}
    fn: Callable[[int, int, int], int]  # (a, b, p) -> answer
    b_nonzero: bool = False


OPERATIONS: dict[ToyOperation, Operation] = {
    ToyOperation.add: Operation("{a} + {b} =", lambda a, b, p: (a + b) % p),
    ToyOperation.sub: Operation("{a} - {b} =", lambda a, b, p: (a - b) % p),
    ToyOperation.mul: Operation("{a} * {b} =", lambda a, b, p: (a * b) % p),
    ToyOperation.div: Operation("{a} / {b} =", lambda a, b, p: (a * pow(b, p - 2, p)) % p, b_nonzero=True),
    ToyOperation.sqsum: Operation("{a} ^ 2 + {b} ^ 2 =", lambda a, b, p: (a * a + b * b) % p),
    ToyOperation.muladd: Operation("{a} * {b} + {a} =", lambda a, b, p: (a * b + a) % p),
}
SYMBOLS = ("+", "-", "*", "/", "^", "=", ";")


def _chain(op: Operation, a: int, b: int, p: int) -> tuple[str, int]:
    """Three steps of `op` with the intermediates written: x = a.b, y = b.x, answer = x.y. For add
    and sub, (x, y) is a bijection of (a, b), so every sample's last step is its own (no held-out
    last step was seen in training) and the answer is no function of one written number."""
    x = op.fn(a, b, p)
    y = op.fn(b, x, p)
    steps = [op.template.format(a=a, b=b) + f" {x}", op.template.format(a=b, b=x) + f" {y}",
             op.template.format(a=x, b=y)]
    return " ; ".join(steps), op.fn(x, y, p)


def make_examples(cfg: ToyDataConfig) -> pd.DataFrame:
    """Every (a, b) pair of every group, with a seeded per-group train/held-out split.

    Columns: id, group, op, a, b, answer, prompt, completion, split ("train" | "heldout").
    """
    frames = []
    for group_index, group in enumerate(cfg.groups):
        op = OPERATIONS[group.op]
        a_AB, b_AB = np.meshgrid(np.arange(cfg.p), np.arange(cfg.p), indexing="ij")
        a_N, b_N = a_AB.ravel(), b_AB.ravel()
        if op.b_nonzero:
            keep = (b_N != 0) & ((a_N != 0) | (cfg.form == ToyForm.plain))  # a chain divides by x and y too
            a_N, b_N = a_N[keep], b_N[keep]
        num_pairs = len(a_N)
        rng = np.random.default_rng([cfg.seed, group_index])
        num_train = round(group.train_fraction * num_pairs)
        is_train_N = np.zeros(num_pairs, dtype=bool)
        is_train_N[rng.permutation(num_pairs)[:num_train]] = True
        if cfg.form == ToyForm.chain:
            written = [_chain(op, int(a), int(b), cfg.p) for a, b in zip(a_N, b_N, strict=True)]
            prompts, answers = [w[0] for w in written], [w[1] for w in written]
        else:
            prompts = [op.template.format(a=a, b=b) for a, b in zip(a_N, b_N, strict=True)]
            answers = [op.fn(int(a), int(b), cfg.p) for a, b in zip(a_N, b_N, strict=True)]
        if group.canary:  # random labels, fixed per sample: memorizable, never generalizable
            answers = np.random.default_rng([cfg.seed, group_index, 1]).integers(0, cfg.p, num_pairs).tolist()
        frames.append(
            pd.DataFrame(
                {
                    "id": [f"{group.name}-{a}-{b}" for a, b in zip(a_N, b_N, strict=True)],
                    "group": group.name,
                    "op": str(group.op),
                    "a": a_N,
                    "b": b_N,
                    "answer": answers,
                    "prompt": prompts,
                    "completion": [f" {c}" for c in answers],
                    "split": np.where(is_train_N, "train", "heldout"),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
