import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moegrok.config import TuneConfig
from moegrok.errors import InstructionError
from moegrok.evaluation.tuning import evaluate_loss, lora_model, read_instructions, tune_checkpoint
from tests.reference.models import save_tiny_moe


def instructions(tmp_path, count=48):
    path = tmp_path / "instructions.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a} + {a} =", "completion": f" {(2 * a) % 11}"}) + "\n"
                            for a in range(count)))
    return path


def test_bad_instruction_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1 + 1 =", "completion": " 2"}\n{"prompt": "x"}\n')
    with pytest.raises(InstructionError, match=r"bad.jsonl:2: needs string 'prompt' and 'completion'"):
        read_instructions(path)
    path.write_text('{"prompt": "1 + 1 =", "completion": " 2"}\n\n{oops\n')
    with pytest.raises(InstructionError, match=r"bad.jsonl:3: invalid JSON"):
        read_instructions(path)


def test_lora_lowers_the_loss_and_merges_into_a_loadable_model(tmp_path):
    model_dir = save_tiny_moe("olmoe", tmp_path / "step1")
    pairs = read_instructions(instructions(tmp_path))
    cfg = TuneConfig(method="lora", rank=8, alpha=16, lr=5e-3, epochs=3, batch_size=8, max_length=16)
    result = tune_checkpoint(model_dir, tmp_path / "step1+tuned", pairs, cfg)
    assert result.loss_after < result.loss_before - 0.1
    assert result.num_steps == 3 * 6 and result.num_tokens > 0

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "step1+tuned").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "step1+tuned")
    assert evaluate_loss(merged, tokenizer, pairs, cfg) == pytest.approx(result.loss_after, rel=1e-4)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert evaluate_loss(base, tokenizer, pairs, cfg) == pytest.approx(result.loss_before, rel=1e-4)


def test_merged_model_equals_the_adapter_model(tmp_path):
    model_dir = save_tiny_moe("olmoe", tmp_path / "m")
    cfg = TuneConfig(method="lora", rank=4, alpha=8)
    torch.manual_seed(0)
    adapter = lora_model(AutoModelForCausalLM.from_pretrained(model_dir), cfg).eval()
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a non-trivial adapter
        ids = torch.tensor([[1, 5, 6, 7, 8]])
        expected = adapter(ids).logits
        merged = adapter.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
