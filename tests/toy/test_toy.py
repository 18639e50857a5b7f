import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moegrok.config import ToyDataConfig, ToyGroupConfig, ToyModelConfig, ToyTrainConfig
from moegrok.toy.data import make_examples
from moegrok.toy.summary import grokking_summary
from moegrok.toy.tokenizer import build_tokenizer
from moegrok.toy.train import checkpoint_steps, lr_at, train_toy
from tests.reference.toy import tiny_zoo_config


def test_splits_are_disjoint_deterministic_and_sized():
    cfg = ToyDataConfig(p=13, groups=[ToyGroupConfig("a", "add", 0.7), ToyGroupConfig("d", "div", 0.4)])
    first, second = make_examples(cfg), make_examples(cfg)
    pd.testing.assert_frame_equal(first, second)
    assert first["id"].is_unique
    for group, frame in first.groupby("group"):
        train = frame[frame["split"] == "train"]
        frac = 0.7 if group == "a" else 0.4
        assert len(train) == round(frac * len(frame))
        assert set(train["id"]).isdisjoint(frame.loc[frame["split"] == "heldout", "id"])
    assert len(first[first["group"] == "d"]) == 13 * 12  # division skips b = 0
    other_seed = make_examples(ToyDataConfig(p=13, groups=cfg.groups, seed=1))
    assert not first["split"].equals(other_seed["split"])


def test_answers_are_modular_arithmetic():
    ops = ("add", "sub", "mul", "div", "sqsum", "muladd")
    cfg = ToyDataConfig(p=7, groups=[ToyGroupConfig(op, op, 0.5) for op in ops])
    for row in make_examples(cfg).itertuples():
        a, b, c = row.a, row.b, row.answer
        expected = {"add": a + b, "sub": a - b, "mul": a * b, "sqsum": a * a + b * b, "muladd": a * b + a}.get(row.op)
        if row.op == "div":
            assert (c * b) % 7 == a
        else:
            assert c == expected % 7
        assert row.completion == f" {c}"


def test_canary_answers_are_random_fixed_per_sample_and_seeded():
    groups = [ToyGroupConfig("add", "add", 0.6), ToyGroupConfig("canary", "add", 0.6, canary=True)]
    first = make_examples(ToyDataConfig(p=23, groups=groups))
    canary, add = first[first["group"] == "canary"], first[first["group"] == "add"]
    assert canary["prompt"].tolist() == add["prompt"].tolist()  # the op's prompts, random answers
    assert (canary["answer"].to_numpy() == add["answer"].to_numpy()).mean() < 0.15  # ~1/23 by chance
    assert canary["answer"].between(0, 22).all() and canary["answer"].nunique() > 15
    pd.testing.assert_frame_equal(first, make_examples(ToyDataConfig(p=23, groups=groups)))
    other = make_examples(ToyDataConfig(p=23, groups=groups, seed=1))
    assert not other.loc[other["group"] == "canary", "answer"].equals(canary["answer"])


def test_chain_form_writes_three_steps_of_16_tokens_or_more():
    ops = ("add", "sub", "mul", "div", "muladd")
    frame = make_examples(ToyDataConfig(p=7, form="chain", groups=[ToyGroupConfig(op, op, 0.5) for op in ops]))
    tokenizer = build_tokenizer(7)
    fns = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
           "div": lambda a, b: a * pow(b, 5, 7), "muladd": lambda a, b: a * b + a}
    for row in frame.itertuples():
        f = fns[row.op]
        x = f(row.a, row.b) % 7
        y = f(row.b, x) % 7
        assert row.answer == f(x, y) % 7
        assert row.prompt.count(";") == 2 and f" {x} ; " in row.prompt
        assert len(tokenizer(row.prompt)["input_ids"]) >= 16
    for op in ("add", "sub"):  # the last step (x, y) is a bijection of (a, b): no two samples share it
        last = frame.loc[frame["op"] == op, "prompt"].str.split(";").str[-1]
        assert last.is_unique, op


def test_tokenizer_round_trips(tmp_path):
    tokenizer = build_tokenizer(47)
    text = "12 ^ 2 + 46 ^ 2 ="
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids


@pytest.mark.parametrize(
    ("section", "kwargs", "key"),
    [
        ("data", {"p": 12}, "data.p"),
        ("data", {"groups": [ToyGroupConfig("x", "add", 1.0)]}, "data.groups[0].train_fraction"),
        ("data", {"groups": [ToyGroupConfig("x", "pow", 0.5)]}, "data.groups[0].op"),
        ("model", {"hidden_size": 64, "num_heads": 4}, "model.num_heads"),
        ("model", {"num_experts": 4, "top_k": 8}, "model.top_k"),
        ("train", {"schedule": "linear"}, "train.schedule"),
    ],
)
def test_bad_config_values_name_the_key(section, kwargs, key):
    schema = {"data": ToyDataConfig, "model": ToyModelConfig, "train": ToyTrainConfig}[section]
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        schema(**kwargs)


def test_lr_schedules():
    wsd = ToyTrainConfig(max_steps=100, lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.5)
    assert lr_at(5, wsd) == pytest.approx(0.5)
    assert lr_at(50, wsd) == pytest.approx(1.0)
    assert lr_at(100, wsd) == pytest.approx(wsd.min_lr_ratio)
    cosine = ToyTrainConfig(max_steps=100, lr=1.0, schedule="cosine")
    assert lr_at(100, cosine) == pytest.approx(cosine.min_lr_ratio)


def test_zoo_layout_and_checkpoint_reloads_with_identical_logits(tmp_path):
    captured = {}

    def capture(model, step):
        if step == 4:
            captured["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    zoo = train_toy(tiny_zoo_config(tmp_path / "zoo", "train.max_steps=4", "train.save_every=2"), progress=False,
                    on_step=capture)
    assert checkpoint_steps(zoo) == [0, 2, 4]
    reloaded = AutoModelForCausalLM.from_pretrained(zoo / "step4")
    assert type(reloaded).__name__ == "OlmoeForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(zoo / "step4")
    ids = torch.tensor([tokenizer("3 + 4 =")["input_ids"]])
    from moegrok.toy.model import build_model

    live = build_model(tiny_zoo_config(tmp_path).model, tokenizer, seed=0)
    live.load_state_dict(captured["state"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, live(ids).logits, rtol=0, atol=0)
    samples = pd.read_json(zoo / "samples.jsonl", lines=True)
    bench = pd.read_json(zoo / "benchmark.jsonl", lines=True, dtype={"answer": str})
    assert list(samples.columns) == ["id", "group", "prompt", "completion"]
    assert set(bench["kind"]) == {"exact"} and set(samples["id"]).isdisjoint(bench["id"])
    log = pd.read_parquet(zoo / "train_log.parquet")
    assert sorted(log["step"].unique()) == [0, 2, 3, 4]
    assert {"train_loss", "train_acc", "heldout_loss", "heldout_acc", "lr"} <= set(log.columns)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    whole = train_toy(tiny_zoo_config(tmp_path / "whole"), progress=False)

    def crash(model, step):
        if step == 5:  # after the step-3 checkpoint
            raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train_toy(tiny_zoo_config(part), progress=False, on_step=crash)
    assert checkpoint_steps(part) == [0, 3]
    train_toy(tiny_zoo_config(part), progress=False)
    for name in ("step6/model.safetensors", "train_state/latest.safetensors"):
        expected, resumed = load_file(whole / name), load_file(part / name)
        assert expected.keys() == resumed.keys()
        for key, value in expected.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)
    pd.testing.assert_frame_equal(
        pd.read_parquet(whole / "train_log.parquet"), pd.read_parquet(part / "train_log.parquet")
    )


def test_zoo_refuses_a_different_config(tmp_path):
    train_toy(tiny_zoo_config(tmp_path / "z", "train.max_steps=1"), progress=False)
    cfg = tiny_zoo_config(tmp_path / "z", "train.max_steps=1")
    cfg.data.p = 13
    with pytest.raises(ValueError, match="another config"):
        train_toy(cfg, progress=False)


def test_grokking_summary_finds_the_lag():
    log = pd.DataFrame(
        {
            "step": [0, 10, 20, 30] * 2,
            "group": ["a"] * 4 + ["b"] * 4,
            "train_acc": [0.1, 1.0, 1.0, 1.0, 0.1, 0.5, 1.0, 1.0],
            "heldout_acc": [0.0, 0.1, 0.5, 0.95, 0.0, 0.5, 0.6, 0.7],
        }
    )
    summary = grokking_summary(log).set_index("group")
    assert summary.loc["a", "memorization_step"] == 10
    assert summary.loc["a", "generalization_step"] == 30
    assert summary.loc["a", "generalization_onset"] == 10  # the last checkpoint before the sustained rise
    assert summary.loc["a", "status"] == "grokking"
    assert summary.loc["b", "generalization_step"] is None or pd.isna(summary.loc["b", "generalization_step"])
    assert summary.loc["b", "status"] == "no_lag"  # held-out 0.6 when it memorized: no lag
