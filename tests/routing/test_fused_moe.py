"""The fused experts against each family's eager experts: on CPU the project's Triton kernel runs
under Triton's interpreter (in a subprocess, since TRITON_INTERPRET is read when triton loads);
`gpu` tests run the compiled kernel."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FAMILIES = ("olmoe", "mixtral", "qwen2_moe")

# float32, 6 samples of 3-11 tokens: per family, the largest output difference of every experts module
# (direct call with the same routing), the largest logits difference and whether the recorded ids agree
CHECK = """
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM
from moegrok.routing.fused_moe import set_experts_implementation
from moegrok.routing.recorder import RoutingRecorder
from moegrok.toy.tokenizer import build_tokenizer
from tests.reference.models import tiny_moe_config
from moegrok.data.samples import TokenizedSample

device = sys.argv[1]
tokenizer = build_tokenizer(11)
out = {}
for family in sys.argv[2:]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(family, len(tokenizer))).to(device).eval()
    rng = np.random.default_rng(3)
    samples = [TokenizedSample(f"s{i}", "g", np.concatenate([[1], rng.integers(4, len(tokenizer), n - 1)]), 1)
               for i, n in enumerate((3, 5, 8, 11, 4, 6))]
    x = torch.randn(7, model.config.hidden_size, device=device)
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts") and hasattr(m, "gate_up_proj")]
    ids = torch.stack([torch.randperm(len(experts[0].gate_up_proj), device=device)[:2] for _ in range(7)])
    weights = torch.rand(7, 2, device=device)
    model.set_experts_implementation("eager")
    eager = RoutingRecorder(model).record(samples, checkpoint="c", step=0)
    with torch.no_grad():
        eager_logits = model(torch.as_tensor(samples[0].input_ids, device=device)[None]).logits
        eager_out = [m(x, ids, weights) for m in experts]
    runs = set_experts_implementation(model, "fused_triton", device)
    fused = RoutingRecorder(model).record(samples, checkpoint="c", step=0)
    with torch.no_grad():
        fused_logits = model(torch.as_tensor(samples[0].input_ids, device=device)[None]).logits
        fused_out = [m(x, ids, weights) for m in experts]
    out[family] = {"runs": runs, "experts": len(experts),
                   "experts_diff": max(float((a - b).abs().max()) for a, b in zip(eager_out, fused_out)),
                   "logits_diff": float((eager_logits - fused_logits).abs().max()),
                   "ids_equal": eager["topk_ids"].equals(fused["topk_ids"]),
                   "loss_diff": float(np.abs(eager["loss"].to_numpy() - fused["loss"].to_numpy()).max())}
print(json.dumps(out))
"""


def run_check(device: str, *, interpret: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", CHECK, device, *FAMILIES], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_check("cpu", interpret=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_kernel_matches_the_eager_experts_under_the_interpreter(interpreted, family):
    result = interpreted[family]
    assert result["runs"] == "fused_triton" and result["experts"] >= 2
    assert result["experts_diff"] <= 1e-5
    assert result["logits_diff"] <= 1e-5
    assert result["ids_equal"]
    assert result["loss_diff"] <= 1e-5


@pytest.fixture(scope="module")
def on_gpu():
    pytest.importorskip("triton")
    return run_check("cuda", interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_kernel_matches_the_eager_experts_on_the_gpu(on_gpu, family):
    result = on_gpu[family]
    assert result["runs"] == "fused_triton"
    assert result["experts_diff"] <= 1e-4 and result["logits_diff"] <= 1e-4 and result["ids_equal"]


def test_auto_keeps_transformers_choice_on_cpu_and_names_are_checked():
    from moegrok.routing.fused_moe import resolve_implementation

    assert resolve_implementation("auto", "cpu") == ""
    assert resolve_implementation("fused", "cpu") == "fused_triton"
    assert resolve_implementation("grouped_mm", "cuda") == "grouped_mm"
    with pytest.raises(ValueError, match=r"model\.experts_implementation='fast'"):
        resolve_implementation("fast", "cpu")
