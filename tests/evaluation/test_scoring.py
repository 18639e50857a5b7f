import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from moegrok.errors import BenchmarkError
from moegrok.evaluation.engines import HFEngine
from moegrok.evaluation.items import Item, load_benchmark
from moegrok.evaluation.scoring import (
    accuracy_rows,
    choose,
    code_passes,
    exact_match,
    normalize,
    run_isolated,
    score_items,
)
from tests.reference.models import save_tiny_moe


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


def write_task(folder, name, body, docs):
    write_jsonl(folder / f"{name}.jsonl", docs)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / f'{name}.jsonl'}\n"
        "test_split: test\n" + body
    )
    return folder / f"{name}.yaml"


def test_lm_eval_yaml_with_local_data(tmp_path):
    mc = write_task(tmp_path, "toy_mc", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                    'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n',
                    [{"question": "2 + 3 =", "choices": ["4", "5"], "label": 1}])
    gen = write_task(tmp_path, "toy_gen", 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
                     'doc_to_target: "{{answer}}"\n', [{"id": 7, "question": "1 + 1 =", "answer": "2"}])
    (choice,) = load_benchmark(mc)
    assert (choice.id, choice.group, choice.kind) == ("0", "toy_mc", "multiple_choice")  # no id field: the index
    assert (choice.requests, choice.choices) == ((("2 + 3 =", " 4"), ("2 + 3 =", " 5")), ("4", "5"))
    (generate,) = load_benchmark(gen)
    # lm-eval's defaults: stop at the few-shot delimiter, at most 256 new tokens
    assert (generate.id, generate.prompt, generate.until, generate.max_gen_toks) == ("7", "1 + 1 =", ("\n\n",), 256)


def test_lm_eval_tasks_moegrok_cannot_score_as_lm_eval_are_refused(tmp_path):
    docs = [{"question": "1 + 1 =", "answer": "2"}]
    cases = [
        ("ll", 'output_type: loglikelihood\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n',
         r"ll.yaml: output_type 'loglikelihood' is not supported"),
        ("sampled", 'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
         "generation_kwargs: {until: [x], do_sample: true, temperature: 0.7}\n", r"sampled.yaml: .* sampling"),
        ("bleu", 'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\nmetric_list: [{metric: bleu}]\n',
         r"bleu.yaml: metrics \['bleu'\] are not averaged"),
    ]
    for name, body, message in cases:
        with pytest.raises(BenchmarkError, match=message):
            load_benchmark(write_task(tmp_path, name, body, docs))
    plain = write_task(tmp_path, "plain", 'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n', docs)
    with pytest.raises(BenchmarkError, match=r"plain.yaml: document 0 has no group_field 'subject'"):
        load_benchmark(plain, group_field="subject")


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
    model = AutoModelForCausalLM.from_pretrained(tiny_olmoe).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_olmoe)
    items = [
        Item("e", "math", "exact", "1 + 1 =", answer="definitely not generated"),
        Item("c", "math", "choice", "1 + 1 =", choices=[" 2", " 3"], label=0),
        Item("k", "code", "code", "def f():\n    return 1\n", tests="assert f() == 1"),
    ]
    scored = score_items(engine, items, max_new_tokens=2, code_timeout_s=10)
    assert scored["id"].tolist() == ["e", "c", "k"] and scored["error"].isna().all()
    assert scored.loc[0, "score"] == 0.0
    logliks = [reference_loglikelihood(model, tokenizer("1 + 1 =")["input_ids"],
                                       tokenizer(c, add_special_tokens=False)["input_ids"])[0] for c in (" 2", " 3")]
    best = max(range(2), key=lambda i: logliks[i])
    assert scored.loc[1, "prediction"] == [" 2", " 3"][best] and scored.loc[1, "score"] == float(best == 0)
    completion = tokenizer.decode(reference_generate(model, tokenizer, tokenizer(items[2].prompt)["input_ids"],
                                                     max_new_tokens=2), skip_special_tokens=True)
    program = items[2].prompt + completion + "\n\n" + items[2].tests
    passes = subprocess.run([sys.executable, "-c", program], capture_output=True).returncode == 0
    assert scored.loc[2, "prediction"] == completion and scored.loc[2, "score"] == float(passes)
    accuracy = accuracy_rows(scored, checkpoint="step1", step=1, benchmark="b")
    assert accuracy.set_index("group")["n"].to_dict() == {"code": 1, "math": 2}


def test_run_isolated_fails_only_the_items_whose_inputs_raise():
    results = run_isolated(lambda xs: [1 / x for x in xs], {0: [1, 2], 1: [0], 2: [4]})
    assert results[0] == [1.0, 0.5] and results[2] == [0.25]
    assert isinstance(results[1], ZeroDivisionError)
    assert run_isolated(lambda xs: [2 * x for x in xs], {0: [1, 2], 1: [3]}) == {0: [2, 4], 1: [6]}


def test_score_items_isolates_an_item_whose_scorer_fails(tiny_olmoe):
    engine = HFEngine()
    engine.load(str(tiny_olmoe))
    good = [Item("e", "math", "exact", "1 + 1 =", answer="2"),
            Item("c", "math", "choice", "1 + 1 =", choices=[" 2", " 3"], label=0),
            Item("k", "code", "code", "x = 1\n", tests="assert x == 1")]
    bad = [Item("u", "code", "code", "x = 1\n", tests="assert x == '\ud800'"),  # unencodable: the sandbox raises
           Item("z", "math", "essay", "1 + 1 =")]
    scored = score_items(engine, [good[0], bad[0], good[1], bad[1], good[2]], max_new_tokens=2,
                         code_timeout_s=10).set_index("id")
    alone = score_items(engine, good, max_new_tokens=2, code_timeout_s=10).set_index("id")
    pd.testing.assert_frame_equal(scored.loc[alone.index], alone)
    assert scored.loc["u", "error"].startswith("UnicodeEncodeError") and math.isnan(scored.loc["u", "score"])
    assert scored.loc["z", "error"] == "ValueError: kind='essay' is not a benchmark item kind"
    accuracy = accuracy_rows(scored.reset_index(), checkpoint="step1", step=1, benchmark="b").set_index("group")
    expected = alone.groupby("group")["score"].mean()
    assert accuracy["accuracy"].to_dict() == expected.to_dict()
    assert accuracy[["n", "num_errors"]].to_dict("index") == {"code": {"n": 1, "num_errors": 1},
                                                              "math": {"n": 2, "num_errors": 1}}


def test_accuracy_rows_of_tables_without_an_error_column():
    scored = pd.DataFrame({"id": ["a", "b", "c"], "group": ["g", "g", "h"], "kind": "exact", "prediction": "",
                           "score": [1.0, 0.0, 1.0], "score_norm": [1.0, 0.0, 1.0]})
    accuracy = accuracy_rows(scored, checkpoint="c", step=0, benchmark="b").set_index("group")
    assert accuracy[["accuracy", "n", "num_errors"]].to_dict("index") == {
        "g": {"accuracy": 0.5, "n": 2, "num_errors": 0}, "h": {"accuracy": 1.0, "n": 1, "num_errors": 0}}
