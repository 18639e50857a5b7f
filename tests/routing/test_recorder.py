import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moegrok.config import compose_config
from moegrok.data.samples import TokenizedSample
from moegrok.errors import RoutingError, UnsupportedModelError
from moegrok.metrics.pathways import routing_shape, sample_features
from moegrok.pipeline.sweep import run_sweep
from moegrok.routing.adapters import IDS_WEIGHTS_LOGITS, LOGITS_WEIGHTS_IDS
from moegrok.routing.families import adapter_for
from moegrok.routing.recorder import RoutingRecorder, router_weights
from moegrok.store import ROUTING_SCHEMA, RunDir
from tests.reference.models import MOE_FAMILIES, save_remote_moe, save_tiny_moe
from tests.reference.routing import reference_routing

# toy-vocabulary texts of 4 to 15 tokens: longer ones than the tiny sparse attention's 8 keys, padded in a batch
SAMPLE_TEXTS = [" ".join(np.random.default_rng(length).choice([*map(str, range(11)), "+", "*", "="], length))
                for length in (3, 4, 5, 7, 8, 9, 11, 12, 14)]


def make_samples(tokenizer, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        length = int(rng.integers(3, 12))
        ids = np.concatenate([[tokenizer.bos_token_id], rng.integers(4, len(tokenizer), size=length - 1)])
        samples.append(TokenizedSample(f"s{i}", "g" + str(i % 2), ids.astype(np.int64), int(rng.integers(1, length))))
    return samples


def sweep_config(tmp_path, paths: list[str], *overrides: str):
    """A sweep over saved tiny models (checkpoint name = directory name) and a few toy samples, with
    the primary config's defaults (attention as transformers chooses it: GptOss has no sdpa)."""
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"id": f"t{i}", "group": "g", "prompt": text.rsplit(" ", 1)[0],
                                           "completion": " " + text.rsplit(" ", 1)[1]}) + "\n"
                               for i, text in enumerate(SAMPLE_TEXTS)))
    names = [Path(path).name for path in paths]
    steps = [f"+checkpoints.steps.{name}={i + 1}" for i, name in enumerate(names)]
    return compose_config("sweep", [f"run_dir={tmp_path / 'run'}", f"checkpoints.paths=[{','.join(paths)}]",
                                    *steps, f"samples.paths=[{samples}]",
                                    "samples.shard_size=16", "samples.max_tokens=32", "record.max_retries=0",
                                    "progress=false", *overrides])


def assert_matches_reference(family, model, table, *, rtol=2e-3, atol=2e-3):
    """Every row of a routing table equals the reference routing and loss of its sample."""
    num_layers, num_experts, top_k = routing_shape(table)
    for row in table.to_pylist():
        input_ids = torch.tensor(row["input_ids"])
        reference, logits_TV = reference_routing(family, model, input_ids)
        n = len(input_ids)
        assert len(reference) == num_layers
        got_ids = np.array(row["topk_ids"]).reshape(num_layers, n, top_k)
        got_weights = np.array(row["topk_weights"], dtype=np.float32).reshape(num_layers, n, top_k)
        for layer, (ref_ids, ref_weights) in enumerate(reference):
            np.testing.assert_array_equal(got_ids[layer], ref_ids.numpy(), err_msg=f"{family} layer {layer}")
            np.testing.assert_allclose(got_weights[layer], ref_weights.numpy(), rtol=rtol, atol=atol,
                                       err_msg=f"{family} layer {layer}")
        assert got_ids.max() < num_experts
        scored = slice(row["num_prompt_tokens"] - 1, n - 1)
        ref_loss = F.cross_entropy(logits_TV[scored].float(), input_ids[scored.start + 1 :])
        assert row["loss"] == pytest.approx(float(ref_loss), rel=1e-4, abs=1e-5), family


def test_every_family_recorded_through_the_sweep_matches_the_reference(ray_cluster, tmp_path):
    """One record sweep over a tiny model of every supported family, a refused family (Doge) and a
    Mixtral whose routers are NaN: every supported family's stored ids and weights equal the
    reference; the other two are failure rows that say why, never successes."""
    zoo = tmp_path / "zoo"
    paths = [str(save_tiny_moe(family, zoo / family)) for family in [*MOE_FAMILIES, "doge"]]
    nan_model = AutoModelForCausalLM.from_pretrained(save_tiny_moe("mixtral", zoo / "mixtral_nan"))
    with torch.no_grad():
        nan_model.model.layers[1].mlp.gate.weight.fill_(float("nan"))
    nan_model.save_pretrained(zoo / "mixtral_nan")
    cfg = sweep_config(tmp_path, [*paths, str(zoo / "mixtral_nan")])

    assert run_sweep(cfg, stages=["record"]) == 1
    run = RunDir(cfg.run_dir)
    failures = pd.read_parquet(run.failures).set_index("unit")
    assert sorted(failures.index) == ["doge/shard00000", "mixtral_nan/shard00000"]
    assert "DogeForCausalLM (model_type 'doge') is not supported" in failures.loc["doge/shard00000", "message"]
    assert "MixtralForCausalLM layer 1 (mlp.gate)" in failures.loc["mixtral_nan/shard00000", "message"]
    assert not run.routing_shard("doge", 0).exists() and not run.routing_shard("mixtral_nan", 0).exists()
    for family in MOE_FAMILIES:
        table = pq.read_table(run.routing_shard(family, 0))
        assert table.schema.remove_metadata() == ROUTING_SCHEMA.append(pa.field("input_ids", pa.list_(pa.int32())))
        assert_matches_reference(family, AutoModelForCausalLM.from_pretrained(zoo / family).eval(), table)
        routers_LED = load_file(run.checkpoint_weights(family))["routers"]
        shape = routing_shape(table)
        if family == "zaya":  # an MLP router: no expert rows, so pathway consistency is NaN
            assert routers_LED.shape == (*shape[:2], 1) and routers_LED.isnan().all()
            assert sample_features(table, routers_LED.numpy())["consistency"].isna().all()
        else:
            assert routers_LED.shape[:2] == shape[:2] and routers_LED.isfinite().all()


def test_adapter_named_in_the_config_reaches_the_record_actors(ray_cluster, tmp_path):
    """A family outside transformers (tests/reference/remote_moe.py, loaded with trust_remote_code) has no
    built-in adapter; the one named by model.adapter is imported by the record actor."""
    path = save_remote_moe(tmp_path / "zoo" / "remote")
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with pytest.raises(UnsupportedModelError, match=r"RemoteMoeForCausalLM \(model_type 'remote_moe'\) is not a "
                                                    r"supported MoE architecture.*model\.adapter=package\.module"):
        RoutingRecorder(model)

    cfg = sweep_config(tmp_path, [str(path)], "model.adapter=tests.reference.moe_adapter_example:remote_moe_adapter",
                       "model.trust_remote_code=true")
    assert run_sweep(cfg, stages=["record"]) == 0
    run = RunDir(cfg.run_dir)
    assert_matches_reference("remote_moe", model, pq.read_table(run.routing_shard("remote", 0)))
    torch.testing.assert_close(load_file(run.checkpoint_weights("remote"))["routers"],
                               torch.stack([layer.mlp.gate.weight.detach() for layer in model.model.layers]))


def test_zaya_skip_expert_is_recorded_as_expert_e(tmp_path):
    """ZAYA's skip expert (no computation) is id E with weight 0. transformers loads its balancing
    bias as -1, which keeps the skip out; a bias near the others' lets the router choose it."""
    model = AutoModelForCausalLM.from_pretrained(save_tiny_moe("zaya", tmp_path / "zaya")).eval()
    for layer in model.model.layers:
        layer.mlp.gate.balancing_biases[-1] = 0.003
    samples = make_samples(AutoTokenizer.from_pretrained(tmp_path / "zaya"), 6)
    table = RoutingRecorder(model, keep_input_ids=True).record(samples, checkpoint="c", step=0)
    assert routing_shape(table) == (3, 9, 1)
    ids = np.concatenate(table["topk_ids"].to_pylist())
    weights = np.concatenate(table["topk_weights"].to_pylist())
    assert (ids == 8).any() and (weights[ids == 8] == 0).all() and (weights[ids != 8] > 0).all()
    assert_matches_reference("zaya", model, table)


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    path = save_tiny_moe("granitemoe", tmp_path_factory.mktemp("granite") / "m")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, make_samples(AutoTokenizer.from_pretrained(path), 5)


def _altered(change):
    """A GraniteMoe reader whose (ids, weights) go through `change` first."""
    return lambda module, args, kwargs, output: change(*IDS_WEIGHTS_LOGITS(module, args, kwargs, output))


@pytest.mark.parametrize(("read", "problem"), [
    (LOGITS_WEIGHTS_IDS, r"top-k ids are torch\.float32, expected integers"),  # GraniteMoe returns (ids, w, logits)
    (_altered(lambda ids, w: (ids, ids)), r"top-k weights are torch\.int64, expected floats"),
    (_altered(lambda ids, w: (ids[:, :1], w)), r"ids \(\d+, 1\) and weights \(\d+, 2\), expected \(\d+, 2\)"),
    (_altered(lambda ids, w: (ids + 6, w)), r"top-k ids span \d+\.\.\d+, expected 0\.\.7"),
    (_altered(lambda ids, w: (ids[:, [0, 0]], w)), r"\d+ tokens list an expert twice in their top-2"),
    (_altered(lambda ids, w: (ids, w * float("inf"))), r"\d+ top-k weights are not finite"),
    (_altered(lambda ids, w: (ids, 2 * w)), r"a token's top-k weights sum to 2, expected 1"),
])
def test_a_misread_router_is_an_error_naming_class_and_layer(granite, read, problem):
    from dataclasses import replace

    model, samples = granite
    wrong = replace(adapter_for(model), read=read)
    assert adapter_for(model).read is IDS_WEIGHTS_LOGITS
    with pytest.raises(RoutingError, match=r"GraniteMoeForCausalLM layer 0 \(block_sparse_moe\.router\): " + problem):
        RoutingRecorder(model, adapter=wrong).record(samples, checkpoint="c", step=0)


def test_recorder_output_independent_of_batching(tmp_path):
    path = save_tiny_moe("olmoe", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(path)
    samples = make_samples(AutoTokenizer.from_pretrained(path), 9, seed=1)
    one = RoutingRecorder(model, max_tokens_per_batch=12, loss_chunk_tokens=3).record(samples, checkpoint="c", step=0)
    many = RoutingRecorder(model, max_tokens_per_batch=10_000).record(samples, checkpoint="c", step=0)
    assert one["topk_ids"].equals(many["topk_ids"])
    assert one["sample_id"].to_pylist() == [s.sample_id for s in samples]
    np.testing.assert_allclose(one["loss"].to_numpy(), many["loss"].to_numpy(), rtol=1e-5)
    with_ids = RoutingRecorder(model, keep_input_ids=True).record(samples, checkpoint="c", step=0)
    assert with_ids["input_ids"].to_pylist() == [s.input_ids.tolist() for s in samples]
    assert router_weights(model).shape == (3, 8, 64)


def test_unsupported_architecture_names_the_class_and_what_to_do():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=1, intermediate_size=16))
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM \(model_type 'llama'\) is not a supported "
                                                    r"MoE architecture.*olmoe.*model\.adapter=package\.module"):
        RoutingRecorder(model)


def test_pipelined_recorder_equals_the_inline_one_and_checks_every_batch(granite):
    from dataclasses import replace

    model, samples = granite
    inline = RoutingRecorder(model, max_tokens_per_batch=12, pipeline=False).record(samples, checkpoint="c", step=0)
    piped = RoutingRecorder(model, max_tokens_per_batch=12, pipeline=True).record(samples, checkpoint="c", step=0)
    assert inline.equals(piped) and len(samples) == inline.num_rows
    calls = []

    def wrong_after_first_batch(module, args, kwargs, output):  # the second batch on: ids out of range
        ids, weights = IDS_WEIGHTS_LOGITS(module, args, kwargs, output)
        calls.append(1)
        return (ids + 6, weights) if len(calls) > 3 else (ids, weights)

    recorder = RoutingRecorder(model, adapter=replace(adapter_for(model), read=wrong_after_first_batch),
                               max_tokens_per_batch=12, pipeline=True)
    with pytest.raises(RoutingError, match=r"layer 0 \(block_sparse_moe\.router\): top-k ids span \d+\.\.\d+, "
                                           r"expected 0\.\.7"):
        recorder.record(samples, checkpoint="c", step=0)
    assert len(calls) > 3 and not recorder._stats
