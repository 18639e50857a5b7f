"""RoutingRecorder: a loaded HF MoE model + tokenized samples -> the routing table.

Per token per MoE layer it records the top-k expert ids and weights in router order (highest
weight first) with forward hooks on the routers, and per sample the mean next-token NLL on the
scored tokens. Full-vocabulary logits are computed only for scored positions and in chunks.

Supported families share transformers' router contract (`mlp.gate(hidden) -> (logits,
top-k weights, top-k ids)`); add one with `register_adapter`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from moegrok.batching import length_buckets, pad_batch
from moegrok.samples import TokenizedSample
from moegrok.store import ROUTING_SCHEMA


@dataclass(frozen=True)
class MoeAdapter:
    """Where a family keeps its routers. `routers(model)` -> [(layer_index, router_module)] in
    layer order; a router's forward returns (router_logits, topk_weights, topk_ids) and its
    `.weight` is the (num_experts, hidden) matrix whose rows are the expert embeddings."""

    routers: Callable[[torch.nn.Module], list[tuple[int, torch.nn.Module]]]


def _gate_routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    layers = model.get_decoder().layers
    return [(i, layer.mlp.gate) for i, layer in enumerate(layers) if hasattr(layer.mlp, "gate")]


ADAPTERS: dict[str, MoeAdapter] = {
    "olmoe": MoeAdapter(_gate_routers),
    "mixtral": MoeAdapter(_gate_routers),
    "qwen2_moe": MoeAdapter(_gate_routers),
    "qwen3_moe": MoeAdapter(_gate_routers),
    "deepseek_v2": MoeAdapter(_gate_routers),
    "deepseek_v3": MoeAdapter(_gate_routers),
}


def register_adapter(model_type: str, adapter: MoeAdapter) -> None:
    ADAPTERS[model_type] = adapter


def adapter_for(model: torch.nn.Module) -> MoeAdapter:
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported MoE architecture {model_type!r}; supported: {sorted(ADAPTERS)}. "
            "To add one, call moegrok.routing.register_adapter(model_type, MoeAdapter(routers=fn)) "
            "where fn(model) returns [(layer_index, router_module)] and each router returns "
            "(logits, top-k weights, top-k ids)."
        )
    return ADAPTERS[model_type]


def router_weights(model: torch.nn.Module) -> torch.Tensor:
    """Router weight rows of every MoE layer, (L, E, D) float32 on CPU: the expert embeddings."""
    return torch.stack([r.weight.detach().float().cpu() for _, r in adapter_for(model).routers(model)])


def input_embeddings(model: torch.nn.Module, token_ids: Sequence[int]) -> torch.Tensor:
    """Rows of the input embedding matrix for `token_ids`, (N, D) float32 on CPU."""
    weight = model.get_input_embeddings().weight
    return weight.detach()[torch.as_tensor(list(token_ids), device=weight.device)].float().cpu()


class RoutingRecorder:
    """Records routing and per-sample loss of one model. Reuse it across sample shards."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_tokens_per_batch: int = 16384,
        loss_chunk_tokens: int = 4096,
        keep_input_ids: bool = False,
    ) -> None:
        self.model = model.eval()
        self.routers = adapter_for(model).routers(model)
        if not self.routers:
            raise ValueError(f"{model.config.model_type} model has no MoE layers to record")
        self.num_experts = int(self.routers[0][1].weight.shape[0])
        self.top_k = int(model.config.num_experts_per_tok)
        self.max_tokens_per_batch = max_tokens_per_batch
        self.loss_chunk_tokens = loss_chunk_tokens
        self.keep_input_ids = keep_input_ids
        self.device = next(model.parameters()).device
        self._captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def _hook(self, module, inputs, output) -> None:
        _, weights_NK, ids_NK = output
        self._captured.append((ids_NK, weights_NK))

    @torch.inference_mode()
    def _record_batch(self, samples: list[TokenizedSample]):
        """Flat routing (each sample's (L, n, K) block in turn), and per-sample loss and accuracy."""
        input_ids_BT, attention_mask_BT = (t.to(self.device) for t in pad_batch(samples))
        batch_size, num_tokens_max = input_ids_BT.shape

        self._captured.clear()
        hidden_BTD = self.model.get_decoder()(
            input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False
        ).last_hidden_state
        if len(self._captured) != self.num_layers:
            raise RuntimeError(f"{type(self.model).__name__}: {len(self._captured)} router calls in one forward, "
                               f"expected one per MoE layer ({self.num_layers})")
        ids_BLTK = torch.stack([ids.view(batch_size, num_tokens_max, -1) for ids, _ in self._captured], 1)
        weights_BLTK = torch.stack([w.view(batch_size, num_tokens_max, -1) for _, w in self._captured], 1)
        # router order: highest weight first (some routers return unsorted top-k)
        weights_BLTK, order_BLTK = weights_BLTK.float().sort(dim=-1, descending=True, stable=True)
        ids_BLTK = ids_BLTK.gather(-1, order_BLTK)

        loss_B, accuracy_B = self._sample_losses(hidden_BTD, input_ids_BT, samples)
        # dropping padding in (B, L, T, K) order leaves each sample's (L, n, K) block contiguous
        valid_BLTK = attention_mask_BT.bool()[:, None, :, None].expand_as(ids_BLTK)
        return (ids_BLTK[valid_BLTK].to(torch.int16).cpu().numpy(),
                weights_BLTK[valid_BLTK].to(torch.float16).cpu().numpy(),
                loss_B.cpu().numpy(), accuracy_B.cpu().numpy())

    def _sample_losses(self, hidden_BTD, input_ids_BT, samples) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean NLL and greedy (argmax) accuracy of each sample's scored tokens; vocabulary logits
        only for scored positions, in chunks."""
        first_B = np.array([s.num_prompt_tokens - 1 for s in samples])  # position predicting token 1
        count_B = np.array([len(s.input_ids) for s in samples]) - 1 - first_B
        rows_N = np.repeat(np.arange(len(samples)), count_B)
        cols_N = np.arange(len(rows_N)) - np.repeat(np.cumsum(count_B) - count_B - first_B, count_B)
        rows_N, cols_N = torch.from_numpy(rows_N).to(self.device), torch.from_numpy(cols_N).to(self.device)
        targets_N = input_ids_BT[rows_N, cols_N + 1]
        lm_head = self.model.get_output_embeddings()
        nll_N = torch.empty(len(rows_N), dtype=torch.float32, device=self.device)
        correct_N = torch.empty_like(nll_N)
        for start in range(0, len(rows_N), self.loss_chunk_tokens):
            chunk = slice(start, start + self.loss_chunk_tokens)
            logits_NV = lm_head(hidden_BTD[rows_N[chunk], cols_N[chunk]]).float()
            nll_N[chunk] = F.cross_entropy(logits_NV, targets_N[chunk], reduction="none")
            correct_N[chunk] = (logits_NV.argmax(-1) == targets_N[chunk]).float()
        count_B = torch.from_numpy(count_B).to(self.device, torch.float32)
        loss_B = torch.zeros_like(count_B).index_add_(0, rows_N, nll_N) / count_B
        return loss_B, torch.zeros_like(count_B).index_add_(0, rows_N, correct_N) / count_B

    def record(self, samples: Sequence[TokenizedSample], *, checkpoint: str, step: int) -> pa.Table:
        """The routing table of `samples` (rows in the given order)."""
        batches = length_buckets([len(s.input_ids) for s in samples], max_tokens_per_batch=self.max_tokens_per_batch)
        handles = [router.register_forward_hook(self._hook) for _, router in self.routers]
        try:
            results = [self._record_batch([samples[i] for i in batch]) for batch in batches]
        finally:
            for handle in handles:
                handle.remove()
        order = [i for batch in batches for i in batch]
        columns = [np.concatenate(parts) for parts in zip(*results, strict=True)]
        ids, weights, losses, accuracy = columns or [[]] * 4  # no batches: no samples
        table = routing_table([samples[i] for i in order], ids, weights, losses, checkpoint=checkpoint, step=step,
                              keep_input_ids=self.keep_input_ids, token_accuracy=accuracy)
        shape = {"num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k}
        return table.take(np.argsort(order)).replace_schema_metadata({k: str(v) for k, v in shape.items()})


def _list_array(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def routing_table(samples, topk_ids, topk_weights, losses, *, checkpoint: str, step: int, keep_input_ids: bool,
                  token_accuracy=None):
    """The routing table; `topk_ids`/`topk_weights` hold each sample's (L, n, K) block in turn."""
    num_rows = len(samples)
    num_tokens = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    per_token = len(topk_ids) // max(int(num_tokens.sum()), 1)  # L * K
    if token_accuracy is None:
        token_accuracy = np.full(num_rows, np.nan, dtype=np.float32)
    columns = {
        "checkpoint": pa.array([checkpoint] * num_rows, pa.string()),
        "step": pa.array([step] * num_rows, pa.int64()),
        "sample_id": pa.array([s.sample_id for s in samples], pa.string()),
        "group": pa.array([s.group for s in samples], pa.string()),
        "num_tokens": pa.array(num_tokens, pa.int32()),
        "num_prompt_tokens": pa.array([s.num_prompt_tokens for s in samples], pa.int32()),
        "topk_ids": _list_array(topk_ids, num_tokens * per_token, pa.int16()),
        "topk_weights": _list_array(topk_weights, num_tokens * per_token, pa.float16()),
        "loss": pa.array(losses, pa.float32()),
        "token_accuracy": pa.array(token_accuracy, pa.float32()),
    }
    schema = ROUTING_SCHEMA
    if keep_input_ids:
        input_ids = np.concatenate([s.input_ids for s in samples]) if samples else np.zeros(0)
        columns["input_ids"] = _list_array(input_ids, num_tokens, pa.int32())
        schema = schema.append(pa.field("input_ids", pa.list_(pa.int32())))
    return pa.table(columns, schema=schema)
