"""The record actor's fast path: a compiled decoder (`record.compile`), fixed batch shapes, and a
token budget from free GPU memory (`record.max_tokens_per_batch=0`).

The recorder's router hooks are registered before `torch.compile` so the graph keeps them; batches
are padded to powers of two in both dimensions, so a sweep compiles once per shape (a handful), and
the actor keeps one model whose weights each checkpoint overwrites in place
(`load_checkpoint(..., host=)`), so a new checkpoint does not compile again.
"""

from __future__ import annotations

import torch

from moegrok.routing.adapters import MoeAdapter
from moegrok.routing.families import adapter_for
from moegrok.routing.recorder import DEFAULT_MAX_TOKENS_PER_BATCH, RoutingRecorder

MIN_PADDED_LENGTH = 16


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def padded_shape(batch_size: int, length: int) -> tuple[int, int]:
    """The fixed (rows, columns) a batch of `batch_size` samples of at most `length` tokens runs at."""
    return _next_power_of_two(batch_size), max(MIN_PADDED_LENGTH, _next_power_of_two(length))


def auto_token_budget(model: torch.nn.Module, device: str, *, adapter: MoeAdapter | None = None,
                      memory_share: float = 0.5, padded: bool = False) -> int:
    """record.max_tokens_per_batch=0: off GPU the default; on GPU the tokens whose activations fit
    in `memory_share` of the free memory (torch.cuda.mem_get_info), estimated from the model's shape:
    per token the decoder's hidden states and attention projections, the routed tokens' expert
    activations, the router scores and the captured routing (a few bytes per layer and slot).
    `padded`: batches are padded to `padded_shape`, which at most doubles each dimension, so the
    budget of real tokens is a quarter of what fits."""
    if not device.startswith("cuda"):
        return DEFAULT_MAX_TOKENS_PER_BATCH
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    adapter = adapter or adapter_for(model)
    hidden = int(config.hidden_size)
    inter = int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)
    num_experts, top_k = adapter.num_experts(model.config), adapter.top_k(model.config)
    num_layers = len(adapter.routers(model))
    element = torch.finfo(next(model.parameters()).dtype).bits // 8
    per_token = element * (16 * hidden + 4 * top_k * inter + 2 * num_experts) + 3 * 12 * num_layers * top_k
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    budget = min(int(free * memory_share) // per_token, 1 << 20) // (4 if padded else 1)
    return max(DEFAULT_MAX_TOKENS_PER_BATCH, budget // 1024 * 1024)


def compiled_recorder(model: torch.nn.Module, *, adapter: MoeAdapter | None = None, **options) -> RoutingRecorder:
    """A recorder whose decoder runs under torch.compile (dynamic=False), with its hooks registered
    first and batches padded to `padded_shape`."""
    recorder = RoutingRecorder(model, adapter=adapter, persistent_hooks=True, pad_to=padded_shape, **options)
    recorder.decoder = torch.compile(recorder.adapter.decoder(model), dynamic=False)
    return recorder
