import itertools
import math

import numpy as np
import pytest
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from moegrok.data.samples import TokenizedSample
from moegrok.metrics.pathways import group_metrics, mean_pairwise_distance, sample_features
from moegrok.routing.recorder import routing_table
from tests.reference.pathways import reference_levenshtein


def make_table(routes, *, num_layers, num_experts, top_k, num_prompt=None, checkpoint="c", step=0):
    """routes: list of (ids_LTK, weights_LTK) arrays, one per sample."""
    samples = [
        TokenizedSample(f"s{i:03d}", "g", np.zeros(ids.shape[1], dtype=np.int64),
                        1 if num_prompt is None else num_prompt[i])
        for i, (ids, _) in enumerate(routes)
    ]
    ids = np.concatenate([ids.astype(np.int16).ravel() for ids, _ in routes])
    weights = np.concatenate([w.astype(np.float16).ravel() for _, w in routes])
    table = routing_table(samples, ids, weights, np.arange(len(routes), dtype=np.float32),
                          checkpoint=checkpoint, step=step, keep_input_ids=False)
    meta = {"num_layers": num_layers, "num_experts": num_experts, "top_k": top_k}
    return table.replace_schema_metadata({k: str(v) for k, v in meta.items()})


def random_routes(rng, count, *, num_layers=4, num_experts=8, top_k=2, max_tokens=9):
    routes = []
    for _ in range(count):
        num_tokens = int(rng.integers(2, max_tokens))
        ids = np.stack([[rng.choice(num_experts, top_k, replace=False) for _ in range(num_tokens)]
                        for _ in range(num_layers)])
        weights = rng.dirichlet(np.ones(top_k + 2), size=(num_layers, num_tokens))[..., :top_k]
        weights = np.sort(weights, axis=-1)[..., ::-1]
        routes.append((ids, weights.astype(np.float16).astype(np.float64)))
    return routes


# ------------------------------------------------------------------ slow, obviously-correct reference


def ref_pathway(ids, weights, weight_share, positions="all", num_prompt=1):
    layers = []
    num_tokens = ids.shape[1]
    tokens = range(num_tokens) if positions == "all" else range(num_prompt - 1, num_tokens - 1)
    means = []
    for layer in range(ids.shape[0]):
        total = {}
        for t in tokens:
            for e, w in zip(ids[layer, t], weights[layer, t], strict=True):
                total[int(e)] = total.get(int(e), 0.0) + float(w)
        mean = {e: w / len(tokens) for e, w in total.items()}
        means.append(mean)
        ranked = sorted(mean, key=lambda e: (-mean[e], e))
        kept, share, layer_total = [], 0.0, sum(mean.values())
        for e in ranked:
            if mean[e] <= 0:
                break
            kept.append(e)
            share += mean[e] / layer_total
            if share > weight_share:
                break
        layers.append(kept)
    return layers, means


def ref_consistency(means, routers):
    embeddings = []
    for layer, mean in enumerate(means):
        embeddings.append([sum(mean.get(e, 0.0) * routers[layer][e][d] for e in range(len(routers[layer])))
                           for d in range(len(routers[layer][0]))])
    cosines = []
    for a, b in itertools.pairwise(embeddings):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        cosines.append(dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))))
    return sum(cosines) / len(cosines), 1 - sum(c / (max(cosines) + 1e-8) for c in cosines) / len(cosines)


@pytest.mark.parametrize("positions", ["all", "answer"])
@pytest.mark.parametrize("weight_share", [0.5, 0.7, 0.8])
def test_features_and_metrics_match_the_reference(positions, weight_share):
    rng = np.random.default_rng(int(weight_share * 10))
    routes = random_routes(rng, 12)
    num_prompt = [int(rng.integers(1, ids.shape[1])) for ids, _ in routes]
    table = make_table(routes, num_layers=4, num_experts=8, top_k=2, num_prompt=num_prompt)
    routers = rng.normal(size=(4, 8, 5))
    features = sample_features(table, routers, weight_share=weight_share, positions=positions)

    ref_layers = []
    for i, (ids, weights) in enumerate(routes):
        layers, means = ref_pathway(ids, weights, weight_share, positions, num_prompt[i])
        ref_layers.append(layers)
        row = features.iloc[i]
        assert row["pathway_str"] == "-".join(",".join(map(str, layer)) for layer in layers)
        assert row["pathway_length"] == sum(map(len, layers))
        mean_cos, c_value = ref_consistency(means, routers.tolist())
        assert row["mean_cos"] == pytest.approx(mean_cos, rel=1e-9, abs=1e-9)
        assert row["consistency"] == pytest.approx(c_value, rel=1e-6, abs=1e-6)

    def flat(layers):  # expert ids with a separator symbol per layer boundary
        out = []
        for index, layer in enumerate(layers):
            out += ([-1] if index else []) + layer
        return out

    pairs = [(i, j) for i in range(len(routes)) for j in range(i + 1, len(routes))]
    metrics = group_metrics(features)
    ref_ids = np.mean([reference_levenshtein(flat(ref_layers[i]), flat(ref_layers[j])) for i, j in pairs])
    strings = features["pathway_str"].tolist()
    ref_chars = np.mean([reference_levenshtein(strings[i], strings[j]) for i, j in pairs])
    ref_norm = np.mean([reference_levenshtein(flat(ref_layers[i]), flat(ref_layers[j]))
                        / max(len(flat(ref_layers[i])), len(flat(ref_layers[j]))) for i, j in pairs])
    assert metrics["pathway_distance"] == pytest.approx(ref_ids)
    assert metrics["pathway_distance_chars"] == pytest.approx(ref_chars)
    assert metrics["pathway_distance_norm"] == pytest.approx(ref_norm, rel=1e-5)
    for layer in range(4):
        ref_layer = np.mean([reference_levenshtein(ref_layers[i][layer], ref_layers[j][layer]) for i, j in pairs])
        assert metrics["layer_distance"][layer] == pytest.approx(ref_layer)
    assert (metrics["num_samples"], metrics["num_pairs"], metrics["pairs"]) == (12, 66, "exact")


def hand_route(layers_experts, num_tokens=3):
    """Every token of layer l routed to the given (expert, weight) pairs."""
    ids = np.array([[[e for e, _ in layer] for _ in range(num_tokens)] for layer in layers_experts])
    weights = np.array([[[w for _, w in layer] for _ in range(num_tokens)] for layer in layers_experts])
    return ids, weights


def test_hand_made_pathways():
    a = hand_route([[(3, 0.6), (1, 0.4)], [(5, 0.9), (2, 0.1)]])
    b = hand_route([[(3, 0.6), (1, 0.4)], [(6, 0.9), (2, 0.1)]])  # one substituted expert
    table = make_table([a, a, b], num_layers=2, num_experts=8, top_k=2)
    features = sample_features(table, None, weight_share=0.7)
    assert features["pathway_str"].tolist() == ["3,1-5", "3,1-5", "3,1-6"]
    assert features["mean_cos"].isna().all()  # no router weights given
    same = group_metrics(features.iloc[:2])
    assert same["pathway_distance"] == 0 and same["pathway_distance_chars"] == 0
    one_off = group_metrics(features.iloc[1:])
    assert one_off["pathway_distance"] == 1 and one_off["layer_distance"] == [0.0, 1.0]


def test_perfectly_consistent_layers_reach_the_documented_extreme():
    route = hand_route([[(0, 0.7), (1, 0.3)]] * 3)
    routers = np.tile(np.random.default_rng(0).normal(size=(1, 4, 6)), (3, 1, 1))  # same rows every layer
    features = sample_features(make_table([route], num_layers=3, num_experts=4, top_k=2), routers)
    assert features["mean_cos"].iloc[0] == pytest.approx(1.0)
    assert features["consistency"].iloc[0] == pytest.approx(0.0, abs=1e-6)  # C = 1 - 1/(1 + 1e-8)


def test_sampled_pairs_are_seeded_and_close_to_exact():
    rng = np.random.default_rng(1)
    items = ["".join(rng.choice(list("abcd"), size=rng.integers(3, 9))) for _ in range(600)]  # 3 row blocks
    exact, n_exact, mode = mean_pairwise_distance(items)
    full = process.cdist(items, items, scorer=Levenshtein.distance)
    assert exact == pytest.approx(np.triu(full, k=1).sum() / n_exact, rel=1e-12)
    sampled, n_sampled, sampled_mode = mean_pairwise_distance(items, max_pairs=20_000, seed=5)
    assert (mode, sampled_mode, n_exact, n_sampled) == ("exact", "sampled", 600 * 599 // 2, 20_000)
    assert sampled == pytest.approx(exact, rel=0.02)
    assert mean_pairwise_distance(items, max_pairs=20_000, seed=5)[0] == sampled


def test_group_metrics_do_not_depend_on_row_order():
    rng = np.random.default_rng(2)
    features = sample_features(make_table(random_routes(rng, 30), num_layers=4, num_experts=8, top_k=2),
                               rng.normal(size=(4, 8, 3)))
    shuffled = features.sample(frac=1.0, random_state=0)
    assert group_metrics(features, max_pairs=100, seed=1) == group_metrics(shuffled, max_pairs=100, seed=1)


def test_bad_metric_options_name_the_key():
    table = make_table([hand_route([[(0, 1.0)]])], num_layers=1, num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="metrics.positions="):
        sample_features(table, None, positions="last")
    with pytest.raises(ValueError, match="metrics.weight_share="):
        sample_features(table, None, weight_share=1.0)
    with pytest.raises(ValueError, match="schema metadata"):
        sample_features(table.replace_schema_metadata(None), None)
