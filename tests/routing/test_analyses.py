"""The routing analyses' additive statistics (what the reduce stage sums over shards) against a
direct reference of each analysis, and the direct references against plain loops."""

import numpy as np
import pytest

from moegrok.data.samples import TokenizedSample
from moegrok.routing.analyses import (
    coactivation,
    domain_specialization,
    finalize_statistics,
    merge_statistics,
    shard_statistics,
    token_arrays,
    token_statistics,
)
from moegrok.routing.recorder import routing_table
from tests.reference.routing_analyses import (
    ref_coactivation,
    ref_domain_specialization,
    ref_load_balance,
    ref_saturation,
    ref_vocabulary_specialization,
)

# --------------------------------------------------------------------------- helpers


def random_ids(rng, num_layers, num_tokens, num_experts, k):
    return np.stack([np.stack([rng.choice(num_experts, k, replace=False) for _ in range(num_tokens)])
                     for _ in range(num_layers)])


def table_of(ids_per_sample, input_ids_per_sample):
    samples = [TokenizedSample(f"s{i}", "g" + str(i % 2), np.asarray(tok), 1)
               for i, tok in enumerate(input_ids_per_sample)]
    ids = np.concatenate([ids.astype(np.int16).ravel() for ids in ids_per_sample])
    return routing_table(samples, ids, np.ones(ids.size, np.float16), np.zeros(len(samples), np.float32),
                         checkpoint="c", step=0, keep_input_ids=True)


def finalized(ids_LNK, num_experts, *, reference_LNK=None, input_ids_N=None, min_count=10):
    stats = token_statistics(ids_LNK, num_experts=num_experts, reference_LNK=reference_LNK, input_ids_N=input_ids_N,
                             with_coactivation=True)
    return stats, finalize_statistics(stats, num_experts=num_experts, top_k=ids_LNK.shape[2], min_count=min_count)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("num_experts", "k"), [(64, 8), (8, 2)])  # OLMoE- and Mixtral-shaped
def test_token_arrays_and_saturation(num_experts, k):
    rng = np.random.default_rng(0)
    per_sample = [random_ids(rng, 3, n, num_experts, k) for n in (4, 7, 2)]
    table = table_of(per_sample, [rng.integers(0, 50, n) for n in (4, 7, 2)])
    ids, groups, ids_LNK, input_ids = token_arrays(table, num_layers=3, top_k=k, with_input_ids=True)
    assert ids == ["s0", "s1", "s2"] and ids_LNK.shape == (3, 13, k) and len(input_ids) == 13
    assert list(groups[:5]) == ["g0"] * 4 + ["g1"]
    np.testing.assert_array_equal(ids_LNK[:, 4:11], per_sample[1])
    _, itself = finalized(ids_LNK, num_experts, reference_LNK=ids_LNK)
    np.testing.assert_array_equal(itself["saturation"], 1.0)
    np.testing.assert_array_equal(itself["top1_agreement"], 1.0)
    other = random_ids(rng, 3, 13, num_experts, k)
    _, final = finalized(ids_LNK, num_experts, reference_LNK=other)
    saturation, top1 = ref_saturation(ids_LNK, other)
    np.testing.assert_allclose(final["saturation"], saturation)
    np.testing.assert_allclose(final["top1_agreement"], top1)
    with pytest.raises(ValueError, match="line up"):
        token_statistics(ids_LNK, num_experts=num_experts, reference_LNK=other[:, :5])


def test_coactivation_matches_a_loop():
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 2, 200, 8, 3)
    stats, _ = finalized(ids, 8)
    np.testing.assert_allclose(coactivation(stats), ref_coactivation(ids, 8))
    np.testing.assert_allclose(coactivation(stats, adjacent=True), ref_coactivation(ids, 8, adjacent=True))


def test_random_routing_is_not_domain_specialized():
    rng = np.random.default_rng(2)
    ids = random_ids(rng, 2, 20_000, 16, 4)
    stats, final = finalized(ids, 16)
    ratio = domain_specialization(stats, top_k=4)
    assert ratio.shape == (2, 16)
    np.testing.assert_allclose(ratio, ref_domain_specialization(ids, 16))
    np.testing.assert_allclose(ratio, 1.0, atol=0.08)
    np.testing.assert_allclose(final["domain_specialization_max"], ratio.max(axis=1))
    one_expert = np.zeros((1, 100, 1), dtype=np.int16)
    assert domain_specialization(finalized(one_expert, 4)[0], top_k=1)[0, 0] == pytest.approx(4.0)


def test_vocabulary_specialization():
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 5, 1000)
    always = np.stack([np.stack([tokens % 4, (tokens + 1) % 4], axis=1)])  # id t always -> expert t % 4
    assert finalized(always, 4, input_ids_N=tokens)[1]["vocab_specialization"][0] == pytest.approx(1.0)
    random = random_ids(rng, 1, 1000, 8, 2)
    got = finalized(random, 8, input_ids_N=tokens)[1]["vocab_specialization"]
    assert got[0] < 0.3
    np.testing.assert_allclose(got, ref_vocabulary_specialization(random, tokens, 8, min_count=10))
    assert np.isnan(finalized(random, 8, input_ids_N=tokens, min_count=10_000)[1]["vocab_specialization"][0])


def test_load_balance():
    uniform = np.tile(np.arange(8), 50).reshape(1, 400, 1)
    final = finalized(uniform, 8)[1]
    assert final["load_entropy"][0] == pytest.approx(1.0) and final["load_max_over_mean"][0] == pytest.approx(1.0)
    collapsed = np.zeros((1, 400, 1), dtype=np.int16)
    final = finalized(collapsed, 8)[1]
    assert final["load_entropy"][0] == pytest.approx(0.0) and final["load_max_over_mean"][0] == pytest.approx(8.0)
    rng = np.random.default_rng(5)
    skewed = np.minimum(rng.geometric(0.3, size=(2, 500, 1)), 7)
    final = finalized(skewed, 8)[1]
    entropy, max_over_mean = ref_load_balance(skewed, 8)
    np.testing.assert_allclose(final["load_entropy"], entropy)
    np.testing.assert_allclose(final["load_max_over_mean"], max_over_mean)


def test_shard_statistics_add_up_to_the_direct_analyses():
    rng = np.random.default_rng(4)
    lengths = [5, 9, 3, 6, 8, 4]
    per_sample = [random_ids(rng, 2, n, 8, 2) for n in lengths]
    reference = [random_ids(rng, 2, n, 8, 2) for n in lengths]
    tokens = [rng.integers(0, 6, n) for n in lengths]
    table, ref_table = table_of(per_sample, tokens), table_of(reference, tokens)
    halves = [shard_statistics(table.slice(a, 3), ref_table.slice(a, 3), num_layers=2, num_experts=8, top_k=2,
                               with_coactivation=True) for a in (0, 3)]
    merged = merge_statistics([h["*"] for h in halves])
    final = finalize_statistics(merged, num_experts=8, top_k=2, min_count=2)
    _, _, ids_LNK, input_ids = token_arrays(table, num_layers=2, top_k=2, with_input_ids=True)
    _, _, ref_LNK, _ = token_arrays(ref_table, num_layers=2, top_k=2)
    saturation, top1 = ref_saturation(ids_LNK, ref_LNK)
    np.testing.assert_allclose(final["saturation"], saturation)
    np.testing.assert_allclose(final["top1_agreement"], top1)
    np.testing.assert_allclose(final["domain_specialization_max"], ref_domain_specialization(ids_LNK, 8).max(axis=1))
    entropy, max_over_mean = ref_load_balance(ids_LNK, 8)
    np.testing.assert_allclose(final["load_entropy"], entropy)
    np.testing.assert_allclose(final["load_max_over_mean"], max_over_mean)
    np.testing.assert_allclose(final["vocab_specialization"],
                               ref_vocabulary_specialization(ids_LNK, input_ids, 8, min_count=2))
    np.testing.assert_allclose(coactivation(merged), ref_coactivation(ids_LNK, 8))
    group_tokens = sum(h["g0"]["tokens"][0] for h in halves)
    assert group_tokens == sum(n for i, n in enumerate(lengths) if i % 2 == 0)
    assert "coactivation" not in halves[0]["g0"]  # co-activation is kept for all groups together only
