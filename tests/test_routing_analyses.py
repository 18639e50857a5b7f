import numpy as np
import pytest

from moegrok.routing import routing_table
from moegrok.routing_analyses import (
    coactivation,
    domain_specialization,
    load_balance,
    router_saturation,
    token_arrays,
    vocabulary_specialization,
)
from moegrok.samples import TokenizedSample


def random_ids(rng, num_layers, num_tokens, num_experts, k):
    return np.stack([np.stack([rng.choice(num_experts, k, replace=False) for _ in range(num_tokens)])
                     for _ in range(num_layers)])


def table_of(ids_per_sample, input_ids_per_sample, num_layers, k):
    samples = [TokenizedSample(f"s{i}", "g" + str(i % 2), np.asarray(tok), 1)
               for i, tok in enumerate(input_ids_per_sample)]
    ids = np.concatenate([ids.astype(np.int16).ravel() for ids in ids_per_sample])
    return routing_table(samples, ids, np.ones(ids.size, np.float16), np.zeros(len(samples), np.float32),
                         checkpoint="c", step=0, keep_input_ids=True)


@pytest.mark.parametrize(("num_experts", "k"), [(64, 8), (8, 2)])  # OLMoE- and Mixtral-shaped
def test_token_arrays_and_saturation(num_experts, k):
    rng = np.random.default_rng(0)
    per_sample = [random_ids(rng, 3, n, num_experts, k) for n in (4, 7, 2)]
    table = table_of(per_sample, [rng.integers(0, 50, n) for n in (4, 7, 2)], 3, k)
    ids, groups, ids_LNK, input_ids = token_arrays(table, num_layers=3, top_k=k, with_input_ids=True)
    assert ids == ["s0", "s1", "s2"] and ids_LNK.shape == (3, 13, k) and len(input_ids) == 13
    assert list(groups[:5]) == ["g0"] * 4 + ["g1"]
    np.testing.assert_array_equal(ids_LNK[:, 4:11], per_sample[1])
    saturation, top1 = router_saturation(ids_LNK, ids_LNK)
    np.testing.assert_array_equal(saturation, 1.0)
    np.testing.assert_array_equal(top1, 1.0)
    other = random_ids(rng, 3, 13, num_experts, k)
    saturation, top1 = router_saturation(ids_LNK, other)
    for layer in range(3):
        expected = np.mean([len(set(ids_LNK[layer, t]) & set(other[layer, t])) / k for t in range(13)])
        assert saturation[layer] == pytest.approx(expected)
        assert top1[layer] == pytest.approx(np.mean(ids_LNK[layer, :, 0] == other[layer, :, 0]))
    with pytest.raises(ValueError, match="line up"):
        router_saturation(ids_LNK, other[:, :5])


def test_coactivation_matches_a_loop():
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 2, 200, 8, 3)
    got, adjacent = coactivation(ids, 8), coactivation(ids, 8, adjacent=True)
    for layer in range(2):
        both = np.zeros((8, 8))
        near = np.zeros((8, 8))
        selected = np.zeros(8)
        for token in ids[layer]:
            for a in token:
                selected[a] += 1
                for b in token:
                    both[a, b] += a != b
            for j in range(len(token) - 1):
                near[token[j], token[j + 1]] += 1
                near[token[j + 1], token[j]] += 1
        np.testing.assert_allclose(got[layer], both / selected[:, None])
        np.testing.assert_allclose(adjacent[layer], near / selected[:, None])


def test_random_routing_is_not_domain_specialized():
    rng = np.random.default_rng(2)
    ratio = domain_specialization(random_ids(rng, 2, 20_000, 16, 4), 16)
    assert ratio.shape == (2, 16)
    np.testing.assert_allclose(ratio, 1.0, atol=0.08)
    one_expert = np.zeros((1, 100, 1), dtype=np.int16)
    assert domain_specialization(one_expert, 4)[0, 0] == pytest.approx(4.0)


def test_vocabulary_specialization():
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 5, 1000)
    always = np.stack([np.stack([tokens % 4, (tokens + 1) % 4], axis=1)])  # id t always -> expert t % 4
    assert vocabulary_specialization(always, tokens, 4)[0] == pytest.approx(1.0)
    random = random_ids(rng, 1, 1000, 8, 2)
    assert vocabulary_specialization(random, tokens, 8)[0] < 0.3
    assert np.isnan(vocabulary_specialization(random, tokens, 8, min_count=10_000)[0])


def test_load_balance():
    uniform = np.tile(np.arange(8), 50).reshape(1, 400, 1)
    entropy, max_over_mean = load_balance(uniform, 8)
    assert entropy[0] == pytest.approx(1.0) and max_over_mean[0] == pytest.approx(1.0)
    collapsed = np.zeros((1, 400, 1), dtype=np.int16)
    entropy, max_over_mean = load_balance(collapsed, 8)
    assert entropy[0] == pytest.approx(0.0) and max_over_mean[0] == pytest.approx(8.0)


def test_shard_statistics_add_up_to_the_direct_analyses():
    from moegrok.routing_analyses import finalize_statistics, merge_statistics, shard_statistics

    rng = np.random.default_rng(4)
    lengths = [5, 9, 3, 6, 8, 4]
    per_sample = [random_ids(rng, 2, n, 8, 2) for n in lengths]
    reference = [random_ids(rng, 2, n, 8, 2) for n in lengths]
    tokens = [rng.integers(0, 6, n) for n in lengths]
    table = table_of(per_sample, tokens, 2, 2)
    ref_table = table_of(reference, tokens, 2, 2)
    halves = [shard_statistics(table.slice(a, 3), ref_table.slice(a, 3), num_layers=2, num_experts=8, top_k=2,
                               with_coactivation=True) for a in (0, 3)]
    merged = merge_statistics([h["*"] for h in halves])
    final = finalize_statistics(merged, num_experts=8, top_k=2, min_count=2)
    _, _, ids_LNK, input_ids = token_arrays(table, num_layers=2, top_k=2, with_input_ids=True)
    _, _, ref_LNK, _ = token_arrays(ref_table, num_layers=2, top_k=2)
    saturation, top1 = router_saturation(ids_LNK, ref_LNK)
    np.testing.assert_allclose(final["saturation"], saturation)
    np.testing.assert_allclose(final["top1_agreement"], top1)
    np.testing.assert_allclose(final["domain_specialization_max"], domain_specialization(ids_LNK, 8).max(axis=1))
    entropy, max_over_mean = load_balance(ids_LNK, 8)
    np.testing.assert_allclose(final["load_entropy"], entropy)
    np.testing.assert_allclose(final["load_max_over_mean"], max_over_mean)
    np.testing.assert_allclose(final["vocab_specialization"],
                               vocabulary_specialization(ids_LNK, input_ids, 8, min_count=2))
    np.testing.assert_array_equal(merged["coactivation"].sum(0) > 0, coactivation(ids_LNK, 8).sum(0) > 0)
    group_tokens = sum(h["g0"]["tokens"][0] for h in halves)
    assert group_tokens == sum(n for i, n in enumerate(lengths) if i % 2 == 0)
