import json

import pandas as pd
import pytest
import torch
from transformers import Trainer, TrainingArguments

from moegrok.data.samples import tokenize_samples
from moegrok.metrics.live import LiveMetrics, LiveMetricsCallback
from moegrok.pipeline import run_sweep
from moegrok.toy.data import make_examples
from moegrok.toy.model import build_model
from moegrok.toy.tokenizer import build_tokenizer, residue_token_ids
from tests.reference.toy import tiny_sweep_config, tiny_zoo_config


class AnswerDataset(torch.utils.data.Dataset):
    """Toy examples with the loss on the answer token only."""

    def __init__(self, frame, tokenizer):
        self.items = []
        for sample in tokenize_samples(frame.assign(text=None), tokenizer, max_tokens=16):
            labels = sample.input_ids.copy()
            labels[: sample.num_prompt_tokens] = -100
            self.items.append({"input_ids": torch.tensor(sample.input_ids), "labels": torch.tensor(labels)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_trainer_callback_matches_the_offline_sweep(tmp_path, ray_cluster):
    cfg = tiny_zoo_config(tmp_path / "unused")
    examples = make_examples(cfg.data)
    train = examples[examples["split"] == "train"]
    tokenizer = build_tokenizer(cfg.data.p)
    model = build_model(cfg.model, tokenizer, seed=0)
    probe_frame = train.groupby("group").head(12)
    probe = tokenize_samples(probe_frame.assign(text=None), tokenizer, max_tokens=16)
    live_metrics = LiveMetrics(probe, every=2, residue_token_ids=residue_token_ids(tokenizer, cfg.data.p),
                               log_path=tmp_path / "pathways.parquet")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=16,
                             learning_rate=3e-3, weight_decay=1.0, save_strategy="steps", save_steps=2,
                             logging_steps=1, report_to=[], use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=AnswerDataset(train, tokenizer),
                      processing_class=tokenizer)
    trainer.add_callback(LiveMetricsCallback(live_metrics, trainer))
    trainer.train()

    live = pd.read_parquet(tmp_path / "pathways.parquet")
    assert sorted(live["step"].unique()) == [2, 4] and set(live["group"]) == {"add", "mul"}
    logged = [entry for entry in trainer.state.log_history if "pathway/add/pathway_distance" in entry]
    assert len(logged) == 2

    samples = tmp_path / "probe.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in probe_frame[["id", "group", "prompt", "completion"]]
                               .to_dict("records")))
    sweep = tiny_sweep_config(tmp_path / "out", tmp_path / "run", "eval.enabled=false",
                              "checkpoints.pattern=checkpoint-2", r"checkpoints.step_regex='checkpoint-(?P<step>\d+)'",
                              f"samples.paths=[{samples}]", "samples.max_tokens=16")
    assert run_sweep(sweep) == 0
    offline = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    offline = offline[offline["sample_set"] == "all"].set_index("group")
    at_two = live[live["step"] == 2].set_index("group")
    for column in ("num_samples", "pathway_distance", "pathway_distance_norm", "pathway_length", "mean_cos",
                   "consistency", "loss_mean", "med"):
        for group in ("add", "mul"):
            assert at_two.loc[group, column] == pytest.approx(offline.loc[group, column], rel=1e-5, abs=1e-6)


def test_toy_training_log_carries_live_pathway_metrics(tmp_path):
    from moegrok.toy.train import train_toy

    zoo = train_toy(tiny_zoo_config(tmp_path / "zoo", "train.max_steps=4", "train.save_every=2", "train.log_every=2",
                                    "train.live_metrics.samples_per_group=8"), progress=False)
    log = pd.read_parquet(zoo / "train_log.parquet")
    assert {"pathway_distance", "pathway_distance_answer", "mean_cos", "consistency", "med"} <= set(log.columns)
    assert log["pathway_distance"].notna().all() and (log["num_samples"] == 8).all()
    assert sorted(log["step"].unique()) == [0, 2, 4]
