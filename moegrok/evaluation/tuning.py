"""The paper's tune-then-evaluate protocol: LoRA instruction tuning of a checkpoint with peft,
merged into a new HF model dir (safetensors) that the evaluation engines load unchanged.

Instruction data: jsonl with `prompt` and `completion` per line (loss on the completion only).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moegrok.config import TuneConfig
from moegrok.data.jsonl import InvalidJSON, jsonl_records
from moegrok.errors import InstructionError
from moegrok.store import atomic_path


@dataclass(frozen=True)
class TuneResult:
    loss_before: float
    loss_after: float
    num_steps: int
    num_tokens: int
    seconds: float


def read_instructions(path: str | Path, *, max_examples: int = 0) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.exists():
        raise InstructionError(f"{path}: no such instruction file")
    pairs = []
    for where, record in jsonl_records(path):
        if isinstance(record, InvalidJSON):
            raise InstructionError(f"{where}: {record}")
        if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                and isinstance(record.get("completion"), str)):
            raise InstructionError(f"{where}: needs string 'prompt' and 'completion'")
        pairs.append((record["prompt"], record["completion"]))
    if not pairs:
        raise InstructionError(f"{path}: no instructions")
    return pairs[:max_examples] if max_examples else pairs


def _batches(pairs, tokenizer, *, batch_size: int, max_length: int, generator: torch.Generator):
    order = torch.randperm(len(pairs), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        encoded = []
        for index in order[start : start + batch_size]:
            prompt, completion = pairs[index]
            prompt_ids = tokenizer(prompt)["input_ids"]
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            ids = (prompt_ids + completion_ids)[-max_length:]
            labels = ([-100] * len(prompt_ids) + completion_ids)[-max_length:]
            encoded.append((ids, labels))
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.zeros(len(encoded), width, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        mask = torch.zeros_like(input_ids)
        for b, (ids, lab) in enumerate(encoded):
            input_ids[b, : len(ids)], labels[b, : len(lab)], mask[b, : len(ids)] = (
                torch.tensor(ids), torch.tensor(lab), 1)
        yield input_ids, labels, mask


def _loss(model, input_ids, labels, mask) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def lora_model(model, cfg: TuneConfig):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def tune_checkpoint(model_dir: str | Path, out_dir: str | Path, pairs: list[tuple[str, str]], cfg: TuneConfig, *,
                    device: str = "cpu", dtype: torch.dtype = torch.float32) -> TuneResult:
    """LoRA-tune the checkpoint in `model_dir` on `pairs`; write the merged model to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True).to(device)
    model = lora_model(model, cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    num_steps = num_tokens = 0
    epoch_losses: list[float] = []
    loss_before = evaluate_loss(model, tokenizer, pairs, cfg, device=device)
    model.train()
    for _ in range(cfg.epochs):
        for input_ids, labels, mask in _batches(pairs, tokenizer, batch_size=cfg.batch_size,
                                               max_length=cfg.max_length, generator=generator):
            input_ids, labels, mask = input_ids.to(device), labels.to(device), mask.to(device)
            loss = _loss(model, input_ids, labels, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_losses.append(loss.item())
            num_steps += 1
            num_tokens += int(mask.sum())
    loss_after = evaluate_loss(model, tokenizer, pairs, cfg, device=device)
    merged = model.merge_and_unload()
    with atomic_path(out_dir, directory=True) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return TuneResult(loss_before, loss_after, num_steps, num_tokens, time.perf_counter() - start)


@torch.no_grad()
def evaluate_loss(model, tokenizer, pairs, cfg: TuneConfig, *, device: str = "cpu") -> float:
    """Mean completion NLL over `pairs` (batch-weighted by scored tokens)."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    for input_ids, labels, mask in _batches(pairs, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                           generator=torch.Generator().manual_seed(0)):
        scored = float((labels[:, 1:] != -100).sum())
        total += float(_loss(model, input_ids.to(device), labels.to(device), mask.to(device))) * scored
        count += scored
    model.train(was_training)
    return total / count if count else math.nan
