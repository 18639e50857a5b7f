"""Full-batch AdamW training of the toy zoo, writing ordinary HF checkpoints `step{N}/`.

Zoo directory:
  step{N}/                  config.json, model.safetensors, tokenizer files (from_pretrained / vLLM)
  samples.jsonl             train split: id, group, prompt, completion (the monitored samples)
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

from moegrok.config import ConfigError, PretrainToyConfig, Schedule, ToyTrainConfig, as_plain
from moegrok.live import LiveMonitor
from moegrok.samples import tokenize_samples
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


def probe_monitor(cfg: PretrainToyConfig, train: pd.DataFrame, tokenizer) -> LiveMonitor | None:
    """A live pathway monitor over a seeded sample of `monitor_samples_per_group` training
    samples per group."""
    per_group = cfg.train.monitor_samples_per_group
    if per_group <= 0:
        return None
    shuffled = train.sample(frac=1.0, random_state=cfg.data.seed)
    probe = shuffled.groupby("group", sort=False).head(per_group).assign(text=None)
    return LiveMonitor(tokenize_samples(probe, tokenizer, max_tokens=64), every=cfg.train.log_every,
                       positions=tuple(cfg.train.monitor_positions),
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


def train_toy(
    cfg: PretrainToyConfig, *, progress: bool = True, on_step: StepHook | None = None
) -> Path:
    """Train (or resume) the zoo in `cfg.out_dir`; returns the zoo directory.

    `on_step(model, step)` runs after every optimizer step. With
    `train.monitor_samples_per_group` > 0 the live pathway monitor adds its metrics to the
    training log at every logging step.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no bar per checkpoint write
    train_cfg = cfg.train
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    out = Path(cfg.out_dir)
    examples = make_examples(cfg.data)
    _write_zoo_files(cfg, out, examples)
    tokenizer = build_tokenizer(cfg.data.p)
    groups = [g.name for g in cfg.data.groups]
    train = Split.build(examples[examples["split"] == "train"], tokenizer, groups)
    heldout = Split.build(examples[examples["split"] == "heldout"], tokenizer, groups)

    monitor = probe_monitor(cfg, examples[examples["split"] == "train"], tokenizer)
    model = build_model(cfg.model, tokenizer, seed=train_cfg.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=train_cfg.lr,
        weight_decay=train_cfg.weight_decay,
        betas=(train_cfg.beta1, train_cfg.beta2),
    )
    state_path = out / "train_state" / "latest.safetensors"
    log_path = out / "train_log.parquet"
    start, log_rows = 0, []
    if state_path.exists():
        start = _load_optimizer(optimizer, state_path)
        weights = OlmoeForCausalLM.from_pretrained(out / f"step{start}").state_dict()
        model.load_state_dict(weights)
        if log_path.exists():
            log_rows = pd.read_parquet(log_path).query("step <= @start").to_dict("records")
    model.set_experts_implementation(train_cfg.experts_implementation)
    model.set_attn_implementation(train_cfg.attn_implementation)

    def save(step: int) -> None:
        with atomic_path(out / f"step{step}", directory=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        state_path.parent.mkdir(exist_ok=True)
        _save_optimizer(optimizer, state_path, step)
        write_parquet(pd.DataFrame(log_rows), log_path)

    def log(step: int, lr: float) -> None:
        model.eval()
        with torch.no_grad():
            stats = zip(
                _group_stats("train", train, *train.forward(model)),
                _group_stats("heldout", heldout, *heldout.forward(model)),
                strict=True,
            )
        pathway = {}
        if monitor is not None:
            pathway = {row["group"]: {k: v for k, v in row.items() if k not in ("step", "group")
                                      and not k.startswith("loss_")} for row in monitor.measure(model, step)}
        model.train()
        log_rows.extend({"step": step, "lr": lr, **t, **h, **pathway.get(t["group"], {})} for t, h in stats)

    if start == 0:
        log(0, 0.0)
        save(0)
    model.train()
    bar = tqdm(range(start + 1, train_cfg.max_steps + 1), desc="pretrain toy", disable=not progress,
               initial=start, total=train_cfg.max_steps)
    for step in bar:
        lr = lr_at(step, train_cfg)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        loss = train.forward(model)[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        if on_step is not None:
            on_step(model, step)
        if step % train_cfg.log_every == 0 or step % train_cfg.save_every == 0:
            log(step, lr)
            bar.set_postfix(
                {r["group"]: f"{r['train_acc']:.2f}/{r['heldout_acc']:.2f}" for r in log_rows[-len(groups):]}
            )
        if step % train_cfg.save_every == 0 or step == train_cfg.max_steps:
            save(step)
    return out
