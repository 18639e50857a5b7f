import numpy as np

from moegrok.data.batching import length_buckets, pad_batch
from moegrok.data.samples import TokenizedSample


def test_length_buckets_cover_every_index_within_budget():
    lengths = [5, 1, 9, 9, 2, 7, 3, 30]
    batches = length_buckets(lengths, max_tokens_per_batch=18)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 18


def test_pad_batch_right_pads_in_sample_order():
    samples = [TokenizedSample("a", "g", np.array([5, 6, 7]), 1), TokenizedSample("b", "g", np.array([8]), 1)]
    input_ids, mask = pad_batch(samples)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_equal_length_buckets_never_pad():
    lengths = [5, 1, 9, 9, 2, 5, 5, 30]
    batches = length_buckets(lengths, max_tokens_per_batch=12, equal_lengths=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len({lengths[i] for i in batch}) == 1 for batch in batches)
    assert [len(b) for b in batches if lengths[b[0]] == 5] == [2, 1]  # the budget still splits them
