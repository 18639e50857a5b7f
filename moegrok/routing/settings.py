"""Which experts implementation and compilation the record actors run (no torch import: the
driver says it in the record stage's start-up line)."""

from __future__ import annotations

import importlib.util

from moegrok.config import EXPERTS_IMPLEMENTATIONS as IMPLEMENTATIONS

FUSED = ("fused", "fused_triton", "fused_vllm")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def vllm_fused_available(*, probe: bool = True) -> bool:
    """vLLM's fused_experts imports (probe=False: only that vLLM is installed, without importing it)."""
    if importlib.util.find_spec("vllm") is None or not probe:
        return importlib.util.find_spec("vllm") is not None
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts  # noqa: F401
    except Exception:
        return False
    return True


def resolve_implementation(name: str, device: str, *, probe: bool = True) -> str:
    """The experts implementation `name` stands for on `device`: auto = the fastest available
    (GPU: vLLM's fused kernel, else the Triton one; CPU: what transformers picks, "")."""
    if name not in IMPLEMENTATIONS and name != "":
        raise ValueError(f"model.experts_implementation={name!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    on_gpu = device.startswith("cuda")
    if name == "auto":
        if not on_gpu:
            return ""
        return "fused_vllm" if vllm_fused_available(probe=probe) else "fused_triton" if triton_available() else ""
    if name == "fused":
        return "fused_vllm" if on_gpu and vllm_fused_available(probe=probe) else "fused_triton"
    return name


def compile_enabled(setting: bool | None, device: str) -> bool:
    """record.compile: null = on when the actor has a GPU."""
    return device.startswith("cuda") if setting is None else setting
