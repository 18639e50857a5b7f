"""Full-batch AdamW training of the toy zoo, writing ordinary HF checkpoints `step{N}/`.

Zoo directory:
  step{N}/                  config.json, model.safetensors, tokenizer files (from_pretrained / vLLM)
  samples.jsonl             train split: id, group, prompt, completion (the training samples a sweep records)
  benchmark.jsonl           held-out split: id, group, kind="exact", prompt, answer
  train_log.parquet         step, group, lr, train_loss, train_acc, heldout_loss, heldout_acc
  train_state/latest.safetensors   optimizer state of the newest checkpoint (for resuming)
  zoo.yaml                  the config that made the zoo; a resume with another config is refused
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import OlmoeForCausalLM, PreTrainedTokenizerFast

from moegrok.config import PretrainToyConfig, Schedule, ToyTrainConfig, as_plain
from moegrok.data.samples import tokenize_samples
from moegrok.errors import ConfigError
from moegrok.metrics.live import LiveMetrics
from moegrok.store import atomic_path, write_parquet
from moegrok.toy.data import make_examples
from moegrok.toy.model import build_model
from moegrok.toy.tokenizer import build_tokenizer, residue_token_ids

STEP_DIR = re.compile(r"^step(\d+)$")
StepHook = Callable[[OlmoeForCausalLM, int], None]


@dataclass
class Split:
    """One split of the toy data as equal-length batches (no padding needed)."""

    groups: list[str]
    buckets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (input_ids_BT, answer_B, group_B)

    @classmethod
    def build(cls, frame: pd.DataFrame, tokenizer: PreTrainedTokenizerFast, groups: list[str]):
        group_index = {g: i for i, g in enumerate(groups)}
        ids = tokenizer(frame["prompt"].tolist())["input_ids"]
        answers = tokenizer.convert_tokens_to_ids([str(a) for a in frame["answer"]])
        frame = frame.assign(_ids=ids, _len=[len(x) for x in ids], _answer=answers)
        buckets = []
        for _, bucket in frame.groupby("_len", sort=True):
            buckets.append(
                (
                    torch.tensor(bucket["_ids"].tolist()),
                    torch.tensor(bucket["_answer"].tolist()),
                    torch.tensor([group_index[g] for g in bucket["group"]]),
                )
            )
        return cls(groups, buckets)

    def forward(self, model: OlmoeForCausalLM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Answer loss and correctness per example, and the example's group index."""
        losses, correct, groups = [], [], []
        for input_ids_BT, answer_B, group_B in self.buckets:
            hidden_BTD = model.model(input_ids=input_ids_BT).last_hidden_state
            logits_BV = model.lm_head(hidden_BTD[:, -1])  # the "=" position predicts the answer
            losses.append(F.cross_entropy(logits_BV.float(), answer_B, reduction="none"))
            correct.append(logits_BV.argmax(-1) == answer_B)
            groups.append(group_B)
        return torch.cat(losses), torch.cat(correct), torch.cat(groups)


def lr_at(step: int, cfg: ToyTrainConfig) -> float:
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(cfg.warmup_steps, 1)
    if cfg.schedule == Schedule.constant:
        return cfg.lr
    if cfg.schedule == Schedule.wsd:
        decay_start = cfg.max_steps * (1 - cfg.decay_fraction)
        progress = max(step - decay_start, 0) / max(cfg.max_steps - decay_start, 1)
        return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * min(progress, 1.0))
    progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def checkpoint_steps(zoo_dir: Path) -> list[int]:
    return sorted(int(m[1]) for d in zoo_dir.glob("step*") if (m := STEP_DIR.match(d.name)))


def _save_optimizer(optimizer: torch.optim.Optimizer, path: Path, step: int) -> None:
    tensors = {"step": torch.tensor(step)}
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"{index}.{name}": value for name, value in state.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, tmp)


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> int:
    tensors = load_file(path)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key != "step":
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return int(tensors["step"])


def _group_stats(prefix: str, split: Split, loss_N, correct_N, group_N) -> list[dict]:
    rows = []
    for i, group in enumerate(split.groups):
        mask = group_N == i
        rows.append(
            {
                "group": group,
                f"{prefix}_loss": float(loss_N[mask].mean()),
                f"{prefix}_acc": float(correct_N[mask].float().mean()),
            }
        )
    return rows


def live_metrics(cfg: PretrainToyConfig, train: pd.DataFrame, tokenizer) -> LiveMetrics | None:
    """Live pathway metrics over a seeded sample of `train.live_metrics.samples_per_group`
    training samples per group (None when `train.live_metrics.enabled` is off)."""
    if not cfg.train.live_metrics.enabled:
        return None
    shuffled = train.sample(frac=1.0, random_state=cfg.data.seed)
    probe = shuffled.groupby("group", sort=False).head(cfg.train.live_metrics.samples_per_group).assign(text=None)
    return LiveMetrics(tokenize_samples(probe, tokenizer, max_tokens=64), every=cfg.train.log_every,
                       positions=tuple(cfg.train.live_metrics.positions),
                       residue_token_ids=residue_token_ids(tokenizer, cfg.data.p))


def _write_zoo_files(cfg: PretrainToyConfig, out: Path, examples: pd.DataFrame) -> None:
    config_text = yaml.safe_dump(as_plain(cfg), sort_keys=False)
    zoo_yaml = out / "zoo.yaml"
    if zoo_yaml.exists() and zoo_yaml.read_text() != config_text:
        raise ConfigError(f"out_dir={str(out)!r} holds a zoo trained with another config ({zoo_yaml}); "
                          "choose another out_dir or delete it")
    out.mkdir(parents=True, exist_ok=True)
    zoo_yaml.write_text(config_text)
    train = examples[examples["split"] == "train"]
    heldout = examples[examples["split"] == "heldout"]
    train[["id", "group", "prompt", "completion"]].to_json(
        out / "samples.jsonl", orient="records", lines=True
    )
    heldout.assign(kind="exact", answer=heldout["answer"].astype(str))[
        ["id", "group", "kind", "prompt", "answer"]
    ].to_json(out / "benchmark.jsonl", orient="records", lines=True)


class _ZooTrainer:
    """The state of one training run of a zoo: data splits, model, optimizer, the training log; and
    what happens at a step, a logging step and a checkpoint."""

    def __init__(self, cfg: PretrainToyConfig) -> None:
        self.cfg, self.out = cfg, Path(cfg.out_dir)
        examples = make_examples(cfg.data)
        _write_zoo_files(cfg, self.out, examples)
        self.tokenizer = build_tokenizer(cfg.data.p)
        self.groups = [g.name for g in cfg.data.groups]
        self.train = Split.build(examples[examples["split"] == "train"], self.tokenizer, self.groups)
        self.heldout = Split.build(examples[examples["split"] == "heldout"], self.tokenizer, self.groups)
        self.live = live_metrics(cfg, examples[examples["split"] == "train"], self.tokenizer)
        self.model = build_model(cfg.model, self.tokenizer, seed=cfg.train.seed)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay,
                                           betas=(cfg.train.beta1, cfg.train.beta2))
        self.state_path = self.out / "train_state" / "latest.safetensors"
        self.log_path = self.out / "train_log.parquet"
        self.start, self.log_rows = 0, []
        if self.state_path.exists():  # resume from the newest checkpoint
            self.start = _load_optimizer(self.optimizer, self.state_path)
            self.model.load_state_dict(OlmoeForCausalLM.from_pretrained(self.out / f"step{self.start}").state_dict())
            if self.log_path.exists():
                self.log_rows = pd.read_parquet(self.log_path).query("step <= @self.start").to_dict("records")
        self.model.set_experts_implementation(cfg.train.experts_implementation)
        self.model.set_attn_implementation(cfg.train.attn_implementation)

    def save(self, step: int) -> None:
        with atomic_path(self.out / f"step{step}", directory=True) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        self.state_path.parent.mkdir(exist_ok=True)
        _save_optimizer(self.optimizer, self.state_path, step)
        write_parquet(pd.DataFrame(self.log_rows), self.log_path)

    def log(self, step: int, lr: float) -> None:
        """Per group: train and held-out loss and accuracy, and the live pathway metrics."""
        model = self.model
        model.eval()
        with torch.no_grad():
            stats = zip(_group_stats("train", self.train, *self.train.forward(model)),
                        _group_stats("heldout", self.heldout, *self.heldout.forward(model)), strict=True)
        pathway = {}
        if self.live is not None:
            pathway = {row["group"]: {k: v for k, v in row.items() if k not in ("step", "group")
                                      and not k.startswith("loss_")} for row in self.live.measure(model, step)}
        model.train()
        self.log_rows.extend({"step": step, "lr": lr, **t, **h, **pathway.get(t["group"], {})} for t, h in stats)

    def step(self, step: int) -> float:
        """One full-batch optimizer step; returns its learning rate."""
        lr = lr_at(step, self.cfg.train)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        loss = self.train.forward(self.model)[0].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        return lr

    def accuracy_postfix(self) -> dict[str, str]:
        """train/held-out accuracy per group at the last logging step (the progress bar's)."""
        return {r["group"]: f"{r['train_acc']:.2f}/{r['heldout_acc']:.2f}" for r in self.log_rows[-len(self.groups):]}


def train_toy(
    cfg: PretrainToyConfig, *, progress: bool = True, on_step: StepHook | None = None
) -> Path:
    """Train (or resume) the zoo in `cfg.out_dir`; returns the zoo directory.

    `on_step(model, step)` runs after every optimizer step. With `train.live_metrics.enabled` the
    live pathway metrics of a probe set go into the training log at every logging step.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no bar per checkpoint write
    train_cfg = cfg.train
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    trainer = _ZooTrainer(cfg)
    if trainer.start == 0:
        trainer.log(0, 0.0)
        trainer.save(0)
    trainer.model.train()
    bar = tqdm(range(trainer.start + 1, train_cfg.max_steps + 1), desc="pretrain toy", disable=not progress,
               initial=trainer.start, total=train_cfg.max_steps)
    for step in bar:
        lr = trainer.step(step)
        if on_step is not None:
            on_step(trainer.model, step)
        if step % train_cfg.log_every == 0 or step % train_cfg.save_every == 0:
            trainer.log(step, lr)
            bar.set_postfix(trainer.accuracy_postfix())
        if step % train_cfg.save_every == 0 or step == train_cfg.max_steps:
            trainer.save(step)
    return trainer.out
