"""Multi-group modular arithmetic over a prime p, written as text ("12 + 5 =" -> "17").

Each group is one operation with its own train fraction, so groups memorize together but
generalize (grok) at different steps. The train split is the monitored sample set; the
held-out split is the benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moegrok.config import ToyDataConfig, ToyOperation


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
SYMBOLS = ("+", "-", "*", "/", "^", "=")


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
            a_N, b_N = a_N[b_N != 0], b_N[b_N != 0]
        num_pairs = len(a_N)
        rng = np.random.default_rng([cfg.seed, group_index])
        num_train = round(group.train_fraction * num_pairs)
        is_train_N = np.zeros(num_pairs, dtype=bool)
        is_train_N[rng.permutation(num_pairs)[:num_train]] = True
        answers = [op.fn(int(a), int(b), cfg.p) for a, b in zip(a_N, b_N, strict=True)]
        frames.append(
            pd.DataFrame(
                {
                    "id": [f"{group.name}-{a}-{b}" for a, b in zip(a_N, b_N, strict=True)],
                    "group": group.name,
                    "op": str(group.op),
                    "a": a_N,
                    "b": b_N,
                    "answer": answers,
                    "prompt": [op.template.format(a=a, b=b) for a, b in zip(a_N, b_N, strict=True)],
                    "completion": [f" {c}" for c in answers],
                    "split": np.where(is_train_N, "train", "heldout"),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
