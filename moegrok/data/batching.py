"""Length-bucketed, right-padded batches of token sequences (shared by the recorder and the HF engine)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moegrok.data.samples import TokenizedSample


def length_buckets(lengths: Sequence[int], *, max_tokens_per_batch: int, equal_lengths: bool = False
                   ) -> list[list[int]]:
    """Indices grouped into batches of similar length (`equal_lengths`: the same length, so no
    padding) whose padded size stays within budget."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, current, longest = [], [], 0
    for index in order:
        longest_if_added = max(longest, lengths[index])
        new_length = equal_lengths and longest_if_added != longest
        if current and (new_length or longest_if_added * (len(current) + 1) > max_tokens_per_batch):
            batches.append(current)
            current, longest_if_added = [], lengths[index]
        current.append(int(index))
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def pad_batch(samples: Sequence[TokenizedSample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded with 0 to the longest sample."""
    lengths_B = np.fromiter((len(s.input_ids) for s in samples), dtype=np.int64, count=len(samples))
    mask_BT = np.arange(lengths_B.max()) < lengths_B[:, None]
    input_ids_BT = np.zeros(mask_BT.shape, dtype=np.int64)
    input_ids_BT[mask_BT] = np.concatenate([s.input_ids for s in samples])  # row-major = sample order
    return torch.from_numpy(input_ids_BT), torch.from_numpy(mask_BT.astype(np.int64))
