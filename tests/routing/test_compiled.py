"""The record actor's fast path (moegrok/routing/compiled.py): weights swapped into one model in
place from checkpoint to checkpoint, fixed batch shapes, the compiled decoder's routing record."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from moegrok.config import ModelConfig
from moegrok.data.checkpoints import CheckpointRef, load_checkpoint
from moegrok.data.samples import TokenizedSample
from moegrok.routing.compiled import auto_token_budget, compiled_recorder, padded_shape
from moegrok.routing.recorder import DEFAULT_MAX_TOKENS_PER_BATCH, RoutingRecorder
from tests.reference.models import save_tiny_moe


def samples_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [TokenizedSample(f"s{i}", "g", np.concatenate([[1], rng.integers(4, 16, n - 1)]), 1)
            for i, n in enumerate(lengths)]


def ref(path) -> CheckpointRef:
    return CheckpointRef(name=path.name, step=0, tokens=None, uri=str(path))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return [save_tiny_moe("olmoe", root / f"olmoe{seed}", seed=seed) for seed in (0, 1)] + [
        save_tiny_moe("mixtral", root / "mixtral", seed=2)]


def test_a_checkpoint_swapped_into_the_model_in_place_records_like_a_fresh_load(checkpoints, tmp_path):
    first, second, other = checkpoints
    cfg = ModelConfig()
    host, _ = load_checkpoint(ref(first), cfg, cache_dir=str(tmp_path), device="cpu")
    recorder = RoutingRecorder(host)
    swapped, _ = load_checkpoint(ref(second), cfg, cache_dir=str(tmp_path), device="cpu", host=host)
    assert swapped is host
    samples = samples_of((3, 5, 9, 4))
    fresh = AutoModelForCausalLM.from_pretrained(second).eval()
    assert recorder.record(samples, checkpoint="c", step=0).equals(
        RoutingRecorder(fresh).record(samples, checkpoint="c", step=0))
    different, _ = load_checkpoint(ref(other), cfg, cache_dir=str(tmp_path), device="cpu", host=host)
    assert different is not host and type(different).__name__ == "MixtralForCausalLM"


def test_batches_pad_to_a_few_shapes_and_the_cpu_budget_is_the_default(checkpoints):
    assert padded_shape(5, 3) == (8, 16) and padded_shape(8, 17) == (8, 32) and padded_shape(1, 64) == (1, 64)
    assert len({padded_shape(b, t) for b in range(1, 65) for t in range(2, 257)}) == 7 * 5
    model = AutoModelForCausalLM.from_pretrained(checkpoints[0])
    assert auto_token_budget(model, "cpu") == DEFAULT_MAX_TOKENS_PER_BATCH


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_budget_leaves_room_for_padding(checkpoints):
    model = AutoModelForCausalLM.from_pretrained(checkpoints[0])
    unpadded, padded = auto_token_budget(model, "cuda:0"), auto_token_budget(model, "cuda:0", padded=True)
    assert padded <= max(DEFAULT_MAX_TOKENS_PER_BATCH, unpadded // 4)  # padding at most doubles each dimension


@pytest.mark.slow
def test_the_compiled_decoder_records_what_the_eager_one_does_and_compiles_once_per_shape(checkpoints, tmp_path):
    """torch.compile (inductor, CPU: about a minute on two cores) with hooks registered first."""
    from torch._dynamo.utils import counters

    cfg = ModelConfig()
    model, _ = load_checkpoint(ref(checkpoints[0]), cfg, cache_dir=str(tmp_path), device="cpu")
    samples = samples_of((3, 5, 9, 4, 11, 6), seed=1)
    eager = RoutingRecorder(model).record(samples, checkpoint="c", step=0)
    recorder = compiled_recorder(model)
    counters.clear()
    compiled = recorder.record(samples, checkpoint="c", step=0)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and compiled["topk_ids"].equals(eager["topk_ids"])
    np.testing.assert_allclose(compiled["loss"].to_numpy(), eager["loss"].to_numpy(), rtol=1e-5, atol=1e-5)
    load_checkpoint(ref(checkpoints[1]), cfg, cache_dir=str(tmp_path), device="cpu", host=model)
    swapped = recorder.record(samples, checkpoint="c", step=0)
    assert counters["stats"]["unique_graphs"] == graphs  # the next checkpoint does not compile again
    fresh = AutoModelForCausalLM.from_pretrained(checkpoints[1]).eval()
    assert swapped["topk_ids"].equals(RoutingRecorder(fresh).record(samples, checkpoint="c", step=0)["topk_ids"])
