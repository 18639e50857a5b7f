#!/usr/bin/env bash
# One-shot GPU check from the source tree (no install, no Ray or vLLM needed): the gpu-marked tests
# (the Triton fused-experts kernel on the device) and the GPU record benchmark (every experts
# implementation, compiled and not, OLMoE-1B-7B and Qwen3-30B-A3B shapes, random bf16 weights).
#   bash benchmarks/gpu_check.sh [--samples 600] [--shapes olmoe-1b-7b]   # extra args go to the benchmark
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
PYTHON=${PYTHON:-python}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/routing/test_fused_moe.py tests/routing/test_compiled.py
"$PYTHON" benchmarks/record_throughput.py --gpu --samples 600 "$@"
