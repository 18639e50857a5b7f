import numpy as np
import pytest

from moegrok.metrics.embedding import consecutive_diffs, main_embedding_diff, main_embedding_diff_cyclic


def test_med_is_the_mean_of_the_p_minus_1_consecutive_differences():
    line = np.arange(5, dtype=float)[:, None] * np.array([[3.0, 4.0]])  # steps of length 5, no wrap-around
    assert len(consecutive_diffs(line)) == 4
    assert main_embedding_diff(line) == pytest.approx(5.0)
    assert main_embedding_diff_cyclic(line) == pytest.approx((4 * 5.0 + 20.0) / 5)  # the wrap adds ||phi(4)-phi(0)||
    circle = np.stack([np.cos(2 * np.pi * np.arange(8) / 8), np.sin(2 * np.pi * np.arange(8) / 8)], axis=1)
    assert main_embedding_diff(circle) == pytest.approx(2 * np.sin(np.pi / 8))
    assert main_embedding_diff(np.ones((5, 3))) == 0.0


def test_two_operand_blocks_are_averaged():
    first = np.arange(4, dtype=float)[:, None]
    second = 3 * np.arange(4, dtype=float)[:, None]
    assert main_embedding_diff(first, second) == pytest.approx((1.0 + 3.0) / 2)
    assert main_embedding_diff(first, first) == main_embedding_diff(first)  # a shared token range


def test_bad_embeddings_name_the_shape():
    with pytest.raises(ValueError, match=r"shape \(1, 3\)"):
        main_embedding_diff(np.ones((1, 3)))
