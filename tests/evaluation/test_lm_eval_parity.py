"""lm-eval tasks scored by moegrok (HF and vLLM engines) equal lm-eval's own scores item by item.

lm-eval runs its HF model (`lm_eval.simple_evaluate(model="hf")`) on a tiny OLMoE with a byte-level
BPE tokenizer, both built here, on a generate_until task (few-shot, description, `until`,
`max_gen_toks`, two filters, exact_match options) and a multiple_choice task (few-shot, acc,
acc_norm on choices whose characters and bytes differ, exact_match from is_greedy)."""

import json

import pytest
import torch

from moegrok.evaluation.engines import HFEngine
from moegrok.evaluation.items import load_benchmark
from moegrok.evaluation.lm_eval_tokens import HFTokenization
from moegrok.evaluation.scoring import score_items
from tests.reference.lm_eval import bpe_tokenizer, write_task

ADD = [(a, b) for a in range(1, 9) for b in (2, 5)]


def gen_docs(pairs, prefix):
    return [{"id": f"{prefix}{i}", "question": f"What is {a} plus {b}?", "answer": str(a + b)}
            for i, (a, b) in enumerate(pairs)]


def mc_docs(pairs, prefix):
    return [{"id": f"{prefix}{i}", "question": f"{a} plus {b} is",
             "choices": [str(a + b), str(a + b + 1), "ünknöwn", "né"], "label": i % 2}
            for i, (a, b) in enumerate(pairs)]


GEN_TASK = {
    "task": "parity_gen", "tag": "arithmetic", "output_type": "generate_until",
    "description": "Answer with a number.\n\n", "num_fewshot": 2,
    "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
    "generation_kwargs": {"until": ["\n", "?"], "max_gen_toks": 6},
    "filter_list": [
        {"name": "number", "filter": [{"function": "regex", "regex_pattern": r"(\d+)"}, {"function": "take_first"}]},
        {"name": "raw", "filter": [{"function": "take_first"}]},
    ],
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True,
                     "ignore_punctuation": True, "regexes_to_ignore": [" "]}],
}
MC_TASK = {
    "task": "parity_mc", "output_type": "multiple_choice", "num_fewshot": 1,
    "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
    "metric_list": [{"metric": name, "aggregation": "mean", "higher_is_better": True}
                    for name in ("acc", "acc_norm", "exact_match")],
}


def tiny_trained_olmoe(path, tokenizer, texts, *, steps=60):
    """A tiny OLMoE (head_dim 32, as vLLM needs) trained a few steps on `texts`, so that some
    answers are right and some wrong."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    eos = tokenizer.eos_token_id
    config = OlmoeConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, bos_token_id=eos,
                         eos_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = OlmoeForCausalLM(config)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def parity_setup(tmp_path_factory):
    """(model dir, {task: yaml}, {task: lm-eval's logged samples})."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("parity")
    train, test = ADD[::3], [p for i, p in enumerate(ADD) if i % 3]
    tasks = {"parity_gen": write_task(folder, GEN_TASK, gen_docs(train, "t"), gen_docs(test, "g")),
             "parity_mc": write_task(folder, MC_TASK, mc_docs(train, "t"), mc_docs(test, "m"))}
    texts = [f"{d['question']} {d['answer']}\n" for d in gen_docs(ADD[::2], "x")]
    texts += [f"{d['question']} {d['choices'][0]}\n" for d in mc_docs(ADD[::2], "x")]
    tokenizer = bpe_tokenizer([*texts, "Answer with a number.", "ünknöwn né"])
    model = tiny_trained_olmoe(folder / "model", tokenizer, texts)
    results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model), "dtype": "float32"},
                                      tasks=list(tasks), task_manager=TaskManager(include_path=str(folder)),
                                      batch_size=1, device="cpu", log_samples=True)
    return model, tasks, results["samples"]


def lm_eval_rows(samples):
    """{doc id: (context of the first request, first filter's response, {"metric,filter": value},
    the model's responses: (log-likelihood, is_greedy) per request or the generated text)}."""
    rows = {}
    for sample in samples:
        doc_id = sample["doc"]["id"]
        responses = [resps[0] for resps in sample["resps"]]
        context, response, metrics, _ = rows.get(doc_id, (sample["arguments"][0][0], sample["filtered_resps"][0],
                                                           {}, responses))
        metrics |= {f"{name},{sample['filter']}": float(sample[name]) for name in sample["metrics"]}
        rows[doc_id] = (context, response, metrics, responses)
    return rows


def assert_parity(engine, model, tasks, samples):
    engine.load(str(model))
    for name, yaml_path in tasks.items():
        items = load_benchmark(yaml_path)
        scored = score_items(engine, items, max_new_tokens=1, code_timeout_s=5).set_index("id")
        expected = lm_eval_rows(samples[name])
        assert scored["error"].isna().all(), scored["error"].dropna().to_dict()
        assert sorted(scored.index) == sorted(expected)
        tokens = HFTokenization(engine.tokenizer)
        for item in items:
            context, response, metrics, responses = expected[item.id]
            assert item.prompt == context, item.id
            assert json.loads(scored.loc[item.id, "metrics"]) == metrics, item.id
            if item.kind == "generate_until":
                assert scored.loc[item.id, "prediction"] == response, item.id
            else:  # the same token ids scored to the same log-likelihoods, whatever the argmax
                pairs = [tokens.pair(c, x, max_length=engine.max_length) for c, x in item.requests]
                got = engine.loglikelihood(pairs)
                assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in responses], abs=1e-4), item.id
                assert [greedy for _, greedy in got] == [greedy for _, greedy in responses], item.id
        first = "exact_match,number" if name == "parity_gen" else "acc,none"
        assert scored["score"].tolist() == [expected[item.id][2][first] for item in items]
        assert 0 < scored["score"].mean() < 1  # the model got some right and some wrong: the check can fail


def test_items_carry_lm_eval_prompts_groups_and_ids(parity_setup):
    _, tasks, _ = parity_setup
    items = load_benchmark(tasks["parity_gen"])
    assert {item.group for item in items} == {"arithmetic"}  # the task's tag
    assert items[0].id == "g0" and items[0].until == ("\n", "?") and items[0].max_gen_toks == 6
    assert items[0].prompt.startswith("Answer with a number.\n\n") and items[0].prompt.count("?") == 3
    by_question = load_benchmark(tasks["parity_mc"], group_field="question", id_field="no_such_field")
    assert [item.id for item in by_question] == [str(i) for i in range(len(by_question))]
    assert by_question[0].group == by_question[0].doc["question"]


def test_hf_engine_scores_lm_eval_tasks_like_lm_eval(parity_setup):
    assert_parity(HFEngine(batch_size=4), *parity_setup)


@pytest.mark.vllm
def test_vllm_engine_scores_lm_eval_tasks_like_lm_eval(parity_setup, vllm_engine):
    assert_parity(vllm_engine, *parity_setup)
