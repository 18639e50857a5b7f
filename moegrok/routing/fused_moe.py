"""Fused MoE experts: `model.experts_implementation` = fused | fused_triton | fused_vllm.

Registered with transformers' ExpertsInterface, so every family whose experts module uses
`@use_experts_implementation` (OLMoE, Mixtral, Qwen-MoE, DeepSeek, ...) runs its experts fused
while its own router still decides the routing, which the recorder's hooks read as before.

fused_triton: moegrok's own Triton kernels. The (token, slot) pairs are sorted by expert (on the
device, no host sync) into blocks of one expert each; kernel 1 gathers the blocks' token rows and
computes silu(x W_gate^T) * (x W_up^T), kernel 2 multiplies by W_down^T and the routing weight;
the k weighted rows of a token are summed in slot order. fused_vllm: vLLM's fused_experts.
fused: vLLM's where it imports, else the Triton kernel.
"""

from __future__ import annotations

import torch

from moegrok.errors import UnsupportedModelError
from moegrok.routing.settings import FUSED, resolve_implementation, triton_available, vllm_fused_available

_BLOCK_M = 16


def _is_silu(act) -> bool:
    if act is None:
        return False
    if isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU"):
        return True
    return act is torch.nn.functional.silu


def _check_experts(module: torch.nn.Module) -> None:
    act = getattr(module, "act_fn", None)
    if not (getattr(module, "has_gate", True) and not getattr(module, "has_bias", False)
            and not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True)
            and _is_silu(act)):
        raise UnsupportedModelError(
            f"{type(module).__name__}: the fused experts need SiLU-gated experts with concatenated [gate; up] "
            "weights and no bias; set model.experts_implementation=grouped_mm (or eager) for this family")


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gate_up_kernel(x_ptr, w_ptr, out_ptr, pairs_ptr, block_expert_ptr, block_start_ptr, block_end_ptr,
                        top_k, hidden, inter, stride_xn, stride_we, stride_wn, stride_wk, stride_on,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        IEEE: tl.constexpr):
        block = tl.program_id(0)
        expert = tl.load(block_expert_ptr + block)
        if expert >= 0:
            start = tl.load(block_start_ptr + block)
            end = tl.load(block_end_ptr + block)
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            pair = tl.load(pairs_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # offsets past 2^31
            token = pair // top_k
            cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < inter
            acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            w_base = w_ptr + expert.to(tl.int64) * stride_we
            for k0 in range(0, hidden, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < hidden
                x = tl.load(x_ptr + token[:, None] * stride_xn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                            other=0.0)
                w_mask = k_ok[:, None] & col_ok[None, :]
                w_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
                w_up = tl.load(w_base + (cols[None, :] + inter) * stride_wn + ks[:, None] * stride_wk, mask=w_mask,
                               other=0.0)
                if IEEE:
                    acc_gate += tl.dot(x, w_gate, input_precision="ieee")
                    acc_up += tl.dot(x, w_up, input_precision="ieee")
                else:
                    acc_gate += tl.dot(x, w_gate)
                    acc_up += tl.dot(x, w_up)
            h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
            tl.store(out_ptr + pair[:, None] * stride_on + cols[None, :], h.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _down_kernel(h_ptr, w_ptr, weights_ptr, out_ptr, pairs_ptr, block_expert_ptr, block_start_ptr, block_end_ptr,
                     hidden, inter, stride_hn, stride_we, stride_wn, stride_wk, stride_on,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        block = tl.program_id(0)
        expert = tl.load(block_expert_ptr + block)
        if expert >= 0:
            start = tl.load(block_start_ptr + block)
            end = tl.load(block_end_ptr + block)
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            pair = tl.load(pairs_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # offsets past 2^31
            cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < hidden
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            w_base = w_ptr + expert.to(tl.int64) * stride_we
            for k0 in range(0, inter, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < inter
                h = tl.load(h_ptr + pair[:, None] * stride_hn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                            other=0.0)
                w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                            mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(h, w, input_precision="ieee")
                else:
                    acc += tl.dot(h, w)
            weight = tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
            acc = acc * weight[:, None]
            tl.store(out_ptr + pair[:, None] * stride_on + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def expert_blocks(ids_S: torch.Tensor, num_experts: int, block_m: int = _BLOCK_M):
    """(pairs sorted by expert, block expert (-1: unused), block start, block end), all on the device and
    sized by an upper bound (ceil(S / block_m) + E blocks), so nothing waits for the device."""
    device = ids_S.device
    pairs = ids_S.argsort(stable=True).to(torch.int32)
    counts = torch.bincount(ids_S, minlength=num_experts)[:num_experts]
    starts = counts.cumsum(0) - counts
    blocks = (counts + block_m - 1) // block_m
    block_end_cum = blocks.cumsum(0)
    max_blocks = (len(ids_S) + block_m - 1) // block_m + num_experts
    index = torch.arange(max_blocks, device=device)
    expert = torch.searchsorted(block_end_cum, index, right=True)
    valid = expert < num_experts
    expert_c = expert.clamp(max=num_experts - 1)
    local = index - (block_end_cum[expert_c] - blocks[expert_c])
    start = starts[expert_c] + local * block_m
    end = starts[expert_c] + counts[expert_c]
    return (pairs, torch.where(valid, expert_c, -1).to(torch.int32), start.to(torch.int32), end.to(torch.int32))


def triton_experts(hidden_ND: torch.Tensor, gate_up_E2ID: torch.Tensor, down_EDI: torch.Tensor,
                   ids_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """sum_k weights[n, k] * down[e] @ (silu(gate[e] @ x_n) * (up[e] @ x_n)), e = ids[n, k]."""
    num_tokens, hidden = hidden_ND.shape
    top_k = ids_NK.shape[1]
    num_experts, two_inter, _ = gate_up_E2ID.shape
    inter = two_inter // 2
    x = hidden_ND.contiguous()
    # tiles: small under the interpreter (CPU tests), larger on a GPU once experts get enough rows
    block_m, block_n, block_k = (64, 64, 32) if x.is_cuda and num_tokens * top_k >= 64 * num_experts else (16, 32, 32)
    pairs, block_expert, block_start, block_end = expert_blocks(ids_NK.reshape(-1).long(), num_experts, block_m)
    ieee = x.dtype == torch.float32
    h_SI = torch.empty(num_tokens * top_k, inter, device=x.device, dtype=x.dtype)
    grid = (len(block_expert), triton.cdiv(inter, block_n))
    _gate_up_kernel[grid](x, gate_up_E2ID, h_SI, pairs, block_expert, block_start, block_end, top_k, hidden, inter,
                          x.stride(0), gate_up_E2ID.stride(0), gate_up_E2ID.stride(1), gate_up_E2ID.stride(2),
                          h_SI.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee)
    out_SD = torch.zeros(num_tokens * top_k, hidden, device=x.device, dtype=torch.float32)  # ids >= E: no expert
    weights_S = weights_NK.reshape(-1).contiguous()
    grid = (len(block_expert), triton.cdiv(hidden, block_n))
    _down_kernel[grid](h_SI, down_EDI, weights_S, out_SD, pairs, block_expert, block_start, block_end, hidden, inter,
                       h_SI.stride(0), down_EDI.stride(0), down_EDI.stride(1), down_EDI.stride(2), out_SD.stride(0),
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee)
    return out_SD.view(num_tokens, top_k, hidden).sum(1).to(hidden_ND.dtype)


def fused_triton_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    _check_experts(self)
    return triton_experts(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)


def fused_vllm_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    from vllm.model_executor.layers.fused_moe import fused_experts

    _check_experts(self)
    return fused_experts(hidden_states, self.gate_up_proj, self.down_proj, top_k_weights.to(torch.float32),
                         top_k_index.to(torch.int32))


def register() -> None:
    """Make fused_triton / fused_vllm valid transformers experts implementations (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register("fused_triton", fused_triton_forward)
    ExpertsInterface.register("fused_vllm", fused_vllm_forward)


def set_experts_implementation(model: torch.nn.Module, name: str, device: str) -> str:
    """Apply `model.experts_implementation=name` to `model`; returns the implementation that runs
    (what transformers chose where `name` leaves it to transformers)."""
    resolved = resolve_implementation(name, device)
    if resolved in FUSED:
        if resolved == "fused_triton" and not triton_available():
            raise ValueError(f"model.experts_implementation={name}: triton is not installed")
        if resolved == "fused_vllm" and not vllm_fused_available():
            raise ValueError(f"model.experts_implementation={name}: vLLM's fused_moe does not import here")
        register()
        for module in model.modules():
            if hasattr(module, "gate_up_proj") and hasattr(module, "has_gate"):
                _check_experts(module)
    if resolved:
        model.set_experts_implementation(resolved)
    return getattr(model.config, "_experts_implementation", None) or resolved or "eager"
