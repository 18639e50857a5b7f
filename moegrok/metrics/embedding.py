"""The embedding-uniformity progress measure (main embedding diff, Gu et al., arXiv 2504.03162).

`med`, as the authors compute it (`calculate_embedding_diff` in their released code): over the
input embeddings phi of the residue tokens 0..p-1 of an operand, the mean of the p-1 consecutive
differences ||phi(i+1) - phi(i)||_2 (not cyclic); with a second operand that has tokens of its
own, the mean of the two operands' values. In the toy zoo both operands share one token range, so
the two halves are equal. Under weight decay it falls as the embedding space becomes uniform.

`med_cyclic`: a variant that also counts the wrap-around difference phi(0) - phi(p-1) (p terms),
what moegrok computed before; a new name, not the authors' measure.
"""

from __future__ import annotations

import numpy as np


def consecutive_diffs(embeddings_PD: np.ndarray, *, cyclic: bool = False) -> np.ndarray:
    """||phi(i+1) - phi(i)||_2 for i = 0..p-2 (and p-1 -> 0 when cyclic), rows in residue order."""
    embeddings_PD = np.asarray(embeddings_PD, dtype=np.float64)
    if embeddings_PD.ndim != 2 or len(embeddings_PD) < 2:
        raise ValueError(f"the main embedding diff needs at least 2 residue embeddings as rows, got shape "
                         f"{embeddings_PD.shape}")
    following_PD = np.roll(embeddings_PD, -1, axis=0) if cyclic else embeddings_PD[1:]
    return np.linalg.norm(following_PD - embeddings_PD[: len(following_PD)], axis=1)


def main_embedding_diff(embeddings_PD: np.ndarray, second_operand_PD: np.ndarray | None = None) -> float:
    """MED as the authors compute it: the mean of the p-1 consecutive differences, averaged over the
    two operands' token blocks when the second operand has tokens of its own."""
    first = float(consecutive_diffs(embeddings_PD).mean())
    if second_operand_PD is None:
        return first
    return 0.5 * (first + float(consecutive_diffs(second_operand_PD).mean()))


def main_embedding_diff_cyclic(embeddings_PD: np.ndarray) -> float:
    """The cyclic variant (p terms, phi(p) = phi(0))."""
    return float(consecutive_diffs(embeddings_PD, cyclic=True).mean())
