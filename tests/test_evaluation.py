import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from moegrok.evaluation.benchmarks import BenchmarkError, Item, load_benchmark
from moegrok.evaluation.engines import HFEngine
from moegrok.evaluation.scoring import accuracy_rows, choose, code_passes, exact_match, normalize, score_items
from tests.helpers import save_tiny_moe


def test_normalize_and_exact_match():
    assert normalize("  17 \nmore text") == "17"
    assert exact_match(" The  Answer.", "the answer")
    assert not exact_match("17", "71")
    assert exact_match("", "")


def test_choose_by_sum_and_per_byte():
    assert choose([-1.0, -2.0], [" a", " bb"]) == (0, 0)
    assert choose([-4.0, -5.0], [" a", " bbbbbbbbbb"]) == (0, 1)


def test_code_passes_runs_prompt_completion_and_tests():
    prompt = "def add(a, b):\n"
    assert code_passes(prompt, "    return a + b", "assert add(2, 3) == 5", timeout_s=10)
    assert not code_passes(prompt, "    return a - b", "assert add(2, 3) == 5", timeout_s=10)
    assert not code_passes(prompt, "    while True: pass", "assert add(2, 3) == 5", timeout_s=1)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_benchmark_errors_name_file_and_line(tmp_path):
    good = {"id": "1", "group": "g", "kind": "exact", "prompt": "1 + 1 =", "answer": "2"}
    expected = Item("1", "g", "exact", "1 + 1 =", answer="2")
    assert load_benchmark(write_jsonl(tmp_path / "b.jsonl", [good]))[0] == expected
    cases = [
        ({**good, "kind": "essay"}, r"b.jsonl:2: kind='essay'"),
        ({**good, "kind": "choice", "choices": ["a"], "label": 0}, r"b.jsonl:2: a choice item needs"),
        ({**good, "kind": "code"}, r"b.jsonl:2: a code item needs 'tests'"),
        ({"id": "2", "group": "g", "kind": "exact", "prompt": "x"}, r"b.jsonl:2: an exact item needs 'answer'"),
    ]
    for record, message in cases:
        path = write_jsonl(tmp_path / "b.jsonl", [good, {**record, "id": "2"}])
        with pytest.raises(BenchmarkError, match=message):
            load_benchmark(path)


def test_lm_eval_yaml_with_local_data(tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", [{"question": "2 + 3 =", "choices": ["4", "5"], "label": 1}])
    write_jsonl(tmp_path / "gen.jsonl", [{"question": "1 + 1 =", "answer": "2"}])
    (tmp_path / "mc.yaml").write_text(
        "task: toy_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
    )
    (tmp_path / "gen.yaml").write_text(
        "task: toy_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'gen.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
    )
    (choice,) = load_benchmark(tmp_path / "mc.yaml")
    assert (choice.kind, choice.prompt, choice.choices, choice.label) == ("choice", "2 + 3 =", [" 4", " 5"], 1)
    (exact,) = load_benchmark(tmp_path / "gen.yaml")
    assert (exact.kind, exact.answer) == ("exact", "2")


@pytest.fixture(scope="module")
def tiny_olmoe(tmp_path_factory):
    return save_tiny_moe("olmoe", tmp_path_factory.mktemp("m") / "step1")


def reference_loglikelihood(model, context, continuation):
    """(summed log-probability, every token the argmax) from one plain forward."""
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([context + continuation])).logits[0].float(), -1)
    rows = [logprobs[len(context) - 1 + j] for j in range(len(continuation))]
    return (sum(float(row[t]) for row, t in zip(rows, continuation, strict=True)),
            all(int(row.argmax()) == t for row, t in zip(rows, continuation, strict=True)))


def reference_generate(model, tokenizer, prompt, *, max_new_tokens, stop=()):
    """Greedy tokens without EOS, cut after the first token whose decoded prefix holds a stop string."""
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        tokens = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
    tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
    for end in range(1, len(tokens) + 1):
        if any(s in tokenizer.decode(tokens[:end]) for s in stop):
            return tokens[:end]
    return tokens


def test_hf_engine_matches_a_plain_forward_and_generate(tiny_olmoe):
    engine = HFEngine(batch_size=2)
    engine.load(str(tiny_olmoe))
    model = AutoModelForCausalLM.from_pretrained(tiny_olmoe).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_olmoe)
    assert engine.max_length == model.config.max_position_embeddings
    context = tokenizer("3 + 4 =")["input_ids"]
    prompts = [context, tokenizer("1 =")["input_ids"], tokenizer("0 =")["input_ids"]]
    greedy = reference_generate(model, tokenizer, context, max_new_tokens=2)
    requests = [(context, [5]), (context, [6, 7]), (prompts[1], [9]), (context, greedy)]
    got = engine.loglikelihood(requests)
    for (ctx, cont), (value, is_greedy) in zip(requests, got, strict=True):
        expected, expected_greedy = reference_loglikelihood(model, ctx, cont)
        assert value == pytest.approx(expected, abs=1e-4)
        assert is_greedy == expected_greedy
    assert got[-1][1]  # the model's own greedy continuation is greedy
    generated = engine.generate(prompts, max_new_tokens=6)
    assert generated == [reference_generate(model, tokenizer, p, max_new_tokens=6) for p in prompts]
    # stop at the text of the last but one token of the longest generation
    longest = max(range(len(prompts)), key=lambda i: len(generated[i]))
    stop = (tokenizer.decode(generated[longest][-2:-1]),)
    stopped = engine.generate(prompts, max_new_tokens=6, stop=stop)
    assert stopped == [reference_generate(model, tokenizer, p, max_new_tokens=6, stop=stop) for p in prompts]
    assert len(stopped[longest]) < len(generated[longest])


def test_score_items_every_kind(tiny_olmoe):
    engine = HFEngine()
    engine.load(str(tiny_olmoe))
    items = [
        Item("e", "math", "exact", "1 + 1 =", answer="definitely not generated"),
        Item("c", "math", "choice", "1 + 1 =", choices=[" 2", " 3"], label=0),
        Item("k", "code", "code", "def f():\n    return 1\n", tests="assert f() == 1"),
    ]
    scored = score_items(engine, items, max_new_tokens=2, code_timeout_s=10)
    assert scored["id"].tolist() == ["e", "c", "k"]
    assert scored.loc[0, "score"] == 0.0
    assert scored.loc[1, "prediction"] in (" 2", " 3")
    assert set(scored["score"]) <= {0.0, 1.0} and scored.loc[2, "kind"] == "code"
    accuracy = accuracy_rows(scored, checkpoint="step1", step=1, benchmark="b")
    assert accuracy.set_index("group")["n"].to_dict() == {"code": 1, "math": 2}
