"""A user's own run, swept with nothing but the paths set: a tiny Mixtral pretrained with
transformers' Trainer (its `checkpoint-N` folders), its own samples (prompt + completion and plain
text, three groups), its own jsonl benchmark with multi-token answers and its own lm-eval task."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from moegrok.config import compose_config
from moegrok.evaluation.scoring import normalize
from moegrok.pipeline import run_sweep
from moegrok.store import RunDir, read_tags
from tests.reference.lm_eval import bpe_tokenizer, write_task

PAIRS = [(a, b) for a in range(1, 10) for b in (3, 7)]


def qa(a: int, b: int) -> tuple[str, str]:
    """A question and its multi-token answer."""
    return f"What is {a} plus {b}?", f"{a + b} apples"


@pytest.fixture(scope="module")
def own_run(tmp_path_factory) -> dict[str, Path]:
    """The user's files: checkpoints (HF Trainer output), samples, a benchmark, an lm-eval task."""
    from transformers import (
        DataCollatorForLanguageModeling,
        MixtralConfig,
        MixtralForCausalLM,
        Trainer,
        TrainingArguments,
    )

    folder = tmp_path_factory.mktemp("own_run")
    texts = [f"{q} {a}" for q, a in (qa(a, b) for a, b in PAIRS)]
    code = [f"def add_{a}_{b}(): return {a} + {b}" for a, b in PAIRS[:10]]
    prose = [f"The farmer counted {a} apples and then {b} more apples in the field." for a, b in PAIRS[:10]]
    tokenizer = bpe_tokenizer([*texts, *code, *prose])
    eos = tokenizer.eos_token_id
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id, bos_token_id=eos,
                           eos_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(0)
    dataset = [{"input_ids": tokenizer(text + tokenizer.eos_token)["input_ids"]} for text in texts]  # it learns to stop
    args = TrainingArguments(output_dir=str(folder / "ckpts"), max_steps=120, save_steps=40, learning_rate=1e-2,
                             per_device_train_batch_size=len(dataset), logging_steps=40, report_to=[], use_cpu=True,
                             seed=0)
    Trainer(model=MixtralForCausalLM(config), args=args, train_dataset=dataset, processing_class=tokenizer,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()

    samples = folder / "samples.jsonl"
    rows = [{"id": f"m{i}", "group": "math", "prompt": q, "completion": " " + a}
            for i, (q, a) in enumerate(qa(a, b) for a, b in PAIRS[:10])]
    rows += [{"id": f"c{i}", "group": "code", "text": text} for i, text in enumerate(code)]
    rows += [{"id": f"p{i}", "group": "prose", "text": text} for i, text in enumerate(prose)]
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    benchmark = folder / "benchmark.jsonl"
    questions = [qa(a, b) for a, b in PAIRS]
    benchmark.write_text("".join(json.dumps({"id": f"q{i}", "group": "math", "kind": "exact", "prompt": q,
                                             "answer": a}) + "\n" for i, (q, a) in enumerate(questions)))
    docs = [{"id": f"d{i}", "question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "label": 0}
            for i, (a, b) in enumerate(PAIRS)]
    task = write_task(folder, {"task": "own_mc", "tag": "math", "output_type": "multiple_choice",
                               "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                               "doc_to_target": "label",
                               "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
                      docs[:4], docs[4:])
    return {"ckpts": folder / "ckpts", "samples": samples, "benchmark": benchmark, "task": task, "folder": folder}


def direct_exact_match(checkpoint: Path, items: list[dict]) -> float:
    """HF's own greedy generation of each item, compared after moegrok's normalization, at the
    documented generation length: the longest tokenized answer + 4 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    length = max(len(tokenizer(" " + item["answer"], add_special_tokens=False)["input_ids"]) for item in items) + 4
    right = []
    for item in items:
        prompt = tokenizer(item["prompt"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=length, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        right.append(normalize(text) == normalize(item["answer"]))
    return sum(right) / len(right)


def test_an_own_run_with_only_paths_set_gives_the_right_tables(own_run, tmp_path, ray_cluster):
    files = own_run
    cfg = compose_config("sweep", [
        f"run_dir={tmp_path / 'run'}", f"checkpoints.dir={files['ckpts']}", f"samples.paths=[{files['samples']}]",
        f"eval.benchmarks=[{{name: heldout, path: {files['benchmark']}}}, {{name: mc, path: {files['task']}}}]"])
    assert run_sweep(cfg, stages=["record", "reduce", "evaluate", "analyze"]) == 0
    run = RunDir(cfg.run_dir)
    assert not run.failures.exists() or pd.read_parquet(run.failures).empty  # no unit failed, no record left out
    catalog = pd.read_parquet(run.catalog)
    assert catalog["name"].tolist() == ["checkpoint-40", "checkpoint-80", "checkpoint-120"]
    assert catalog["step"].tolist() == [40, 80, 120]
    samples = pd.read_parquet(run.samples)
    assert read_tags(run.samples)["truncated"] == [] and samples.groupby("group").size().to_dict() == {
        "code": 10, "math": 10, "prose": 10}
    metrics = pd.read_parquet(run.metrics).query("sample_set == 'all'")
    assert set(metrics["group"]) == {"code", "math", "prose"} and metrics["pathway_distance"].notna().all()
    assert metrics["med"].isna().all()  # no residue tokens: the toy's embedding measure is off
    accuracy = pd.read_parquet(run.accuracy).set_index(["benchmark", "checkpoint"])
    items = [json.loads(line) for line in files["benchmark"].read_text().splitlines()]
    for checkpoint in catalog["name"]:
        expected = direct_exact_match(files["ckpts"] / checkpoint, items)
        assert accuracy.loc[("heldout", checkpoint), "accuracy"] == pytest.approx(expected), checkpoint
    assert accuracy.loc[("heldout", "checkpoint-120"), "accuracy"] > 0.5  # multi-token answers can match
    assert accuracy.loc["mc", "n"].eq(len(PAIRS) - 4).all()  # the lm-eval task, scored on its test split
