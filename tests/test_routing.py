import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from moegrok.routing import RoutingRecorder, adapter_for, router_weights
from moegrok.samples import TokenizedSample
from moegrok.store import ROUTING_SCHEMA
from tests.helpers import MOE_FAMILIES, save_tiny_moe


def reference_topk(family: str, logits_NE: torch.Tensor, router, config):
    """Each family's routing from `output_router_logits`, written out plainly."""
    k = config.num_experts_per_tok
    if family == "deepseek_v3":
        scores = logits_NE.float().sigmoid()
        choice = scores + router.e_score_correction_bias
        num_groups = config.n_group
        grouped = choice.view(len(choice), num_groups, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep_groups = group_scores.topk(config.topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores).scatter_(1, keep_groups, 1).bool()
        choice = choice.masked_fill(~mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        ids = choice.topk(k, dim=-1).indices
        weights = scores.gather(1, ids)
        if config.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * config.routed_scaling_factor
    else:
        probs = F.softmax(logits_NE.float(), dim=-1)
        weights, ids = probs.topk(k, dim=-1)
        if family == "mixtral" or getattr(config, "norm_topk_prob", False):
            weights = weights / weights.sum(-1, keepdim=True)
    weights, order = weights.sort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order), weights


def make_samples(tokenizer, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        length = int(rng.integers(3, 12))
        ids = np.concatenate([[tokenizer.bos_token_id], rng.integers(4, len(tokenizer), size=length - 1)])
        samples.append(TokenizedSample(f"s{i}", "g" + str(i % 2), ids.astype(np.int64), int(rng.integers(1, length))))
    return samples


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_recorder_matches_router_logits_reference(family, tmp_path):
    path = save_tiny_moe(family, tmp_path / family)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    samples = make_samples(tokenizer, 7)
    table = RoutingRecorder(model, max_tokens_per_batch=30).record(samples, checkpoint="c", step=3)

    assert table.schema.remove_metadata() == ROUTING_SCHEMA
    assert table["sample_id"].to_pylist() == [s.sample_id for s in samples]
    routers = adapter_for(model).routers(model)
    num_layers, k = len(routers), model.config.num_experts_per_tok
    meta = table.schema.metadata
    assert (int(meta[b"num_layers"]), int(meta[b"top_k"])) == (num_layers, k)
    assert int(meta[b"num_experts"]) == router_weights(model).shape[1]
    for row, sample in zip(table.to_pylist(), samples, strict=True):
        ids = torch.tensor(sample.input_ids)[None]
        with torch.no_grad():
            out = model(ids, output_router_logits=True)
        n = len(sample.input_ids)
        assert row["num_tokens"] == n
        got_ids = np.array(row["topk_ids"]).reshape(num_layers, n, k)
        got_w = np.array(row["topk_weights"], dtype=np.float32).reshape(num_layers, n, k)
        for layer, (_, router) in enumerate(routers):
            ref_ids, ref_w = reference_topk(family, out.router_logits[layer], router, model.config)
            np.testing.assert_array_equal(got_ids[layer], ref_ids.numpy())
            np.testing.assert_allclose(got_w[layer], ref_w.numpy(), rtol=2e-3, atol=2e-3)
        scored = slice(sample.num_prompt_tokens - 1, n - 1)
        ref_loss = F.cross_entropy(out.logits[0, scored].float(), ids[0, scored.start + 1 :])
        assert row["loss"] == pytest.approx(float(ref_loss), rel=1e-4)
        ref_accuracy = (out.logits[0, scored].argmax(-1) == ids[0, scored.start + 1 :]).float().mean()
        assert row["token_accuracy"] == pytest.approx(float(ref_accuracy))


def test_recorder_output_independent_of_batching(tmp_path):
    path = save_tiny_moe("olmoe", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(path)
    samples = make_samples(AutoTokenizer.from_pretrained(path), 9, seed=1)
    one = RoutingRecorder(model, max_tokens_per_batch=12, loss_chunk_tokens=3).record(samples, checkpoint="c", step=0)
    many = RoutingRecorder(model, max_tokens_per_batch=10_000).record(samples, checkpoint="c", step=0)
    assert one["topk_ids"].equals(many["topk_ids"])
    np.testing.assert_allclose(one["loss"].to_numpy(), many["loss"].to_numpy(), rtol=1e-5)
    with_ids = RoutingRecorder(model, keep_input_ids=True).record(samples, checkpoint="c", step=0)
    assert with_ids["input_ids"].to_pylist() == [s.input_ids.tolist() for s in samples]


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=1, intermediate_size=16))
    with pytest.raises(ValueError, match=r"unsupported MoE architecture 'llama'.*olmoe.*register_adapter"):
        RoutingRecorder(model)
