"""The embedding-uniformity progress measure.

Main embedding diff (Gu et al., arXiv 2504.03162): MED = (1/p) sum_i ||phi(i+1) - phi(i)||_2
over the input embeddings phi of the residue tokens 0..p-1, cyclic (phi(p) = phi(0)). Under
weight decay it falls as the embedding space becomes uniform, which comes with generalization.
"""

from __future__ import annotations

import numpy as np


def main_embedding_diff(embeddings_PD: np.ndarray) -> float:
    """MED of the residue embeddings, rows in residue order 0..p-1."""
    embeddings_PD = np.asarray(embeddings_PD, dtype=np.float64)
    if len(embeddings_PD) < 2:
        raise ValueError("the main embedding diff needs at least 2 residue embeddings")
    diffs_PD = np.roll(embeddings_PD, -1, axis=0) - embeddings_PD
    return float(np.linalg.norm(diffs_PD, axis=1).mean())
