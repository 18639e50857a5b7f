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

from moegrok.samples import TokenizedSample
from moegrok.store import ROUTING_SCHEMA


@dataclass(frozen=True)
class MoeAdapter:
    """Where a family keeps its routers. `routers(model)` -> [(layer_index, router_module)] in
    layer order; a router's forward returns (router_logits, topk_weights, topk_ids) and its
    `.weight` is the (num_experts, hidden) matrix whose rows are the expert embeddings."""

    routers: Callable[[torch.nn.Module], list[tuple[int, torch.nn.Module]]]
    shared_experts: bool = False  # always-on experts, not part of a pathway


def _gate_routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    layers = model.get_decoder().layers
    return [(i, layer.mlp.gate) for i, layer in enumerate(layers) if hasattr(layer.mlp, "gate")]


ADAPTERS: dict[str, MoeAdapter] = {
    "olmoe": MoeAdapter(_gate_routers),
    "mixtral": MoeAdapter(_gate_routers),
    "qwen2_moe": MoeAdapter(_gate_routers, shared_experts=True),
    "qwen3_moe": MoeAdapter(_gate_routers),
    "deepseek_v2": MoeAdapter(_gate_routers, shared_experts=True),
    "deepseek_v3": MoeAdapter(_gate_routers, shared_experts=True),
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


def length_buckets(lengths: Sequence[int], *, max_tokens_per_batch: int) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size stays within budget."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, current, longest = [], [], 0
    for index in order:
        longest_if_added = max(longest, lengths[index])
        if current and longest_if_added * (len(current) + 1) > max_tokens_per_batch:
            batches.append(current)
            current, longest_if_added = [], lengths[index]
        current.append(int(index))
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def pad_batch(samples: Sequence[TokenizedSample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded with 0 to the longest sample."""
    input_ids_BT = torch.zeros(len(samples), max(len(s.input_ids) for s in samples), dtype=torch.long)
    attention_mask_BT = torch.zeros_like(input_ids_BT)
    for b, s in enumerate(samples):
        input_ids_BT[b, : len(s.input_ids)] = torch.tensor(s.input_ids)  # a copy: Ray hands out read-only arrays
        attention_mask_BT[b, : len(s.input_ids)] = 1
    return input_ids_BT, attention_mask_BT


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
        # router order: highest weight first (some routers return unsorted top-k)
        weights_NK, order_NK = weights_NK.float().sort(dim=-1, descending=True, stable=True)
        self._captured.append((ids_NK.gather(-1, order_NK), weights_NK))

    @torch.inference_mode()
    def _record_batch(self, samples: list[TokenizedSample]):
        lengths = [len(s.input_ids) for s in samples]
        num_tokens_max = max(lengths)
        input_ids_BT, attention_mask_BT = (t.to(self.device) for t in pad_batch(samples))

        self._captured.clear()
        hidden_BTD = self.model.get_decoder()(
            input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False
        ).last_hidden_state
        assert len(self._captured) == self.num_layers, "every MoE router must fire once per batch"
        ids_LBTK = torch.stack([ids.view(len(samples), num_tokens_max, -1) for ids, _ in self._captured])
        weights_LBTK = torch.stack([w.view(len(samples), num_tokens_max, -1) for _, w in self._captured])

        loss_B, accuracy_B = self._sample_losses(hidden_BTD, input_ids_BT, samples)
        ids_LBTK, weights_LBTK = ids_LBTK.to(torch.int16).cpu(), weights_LBTK.to(torch.float16).cpu()
        return [
            (ids_LBTK[:, b, :n].reshape(-1).numpy(), weights_LBTK[:, b, :n].reshape(-1).numpy())
            for b, n in enumerate(lengths)
        ], loss_B.cpu().numpy(), accuracy_B.cpu().numpy()

    def _sample_losses(self, hidden_BTD, input_ids_BT, samples) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean NLL and greedy (argmax) accuracy of each sample's scored tokens; vocabulary logits
        only for scored positions, in chunks."""
        rows, cols = [], []
        for b, s in enumerate(samples):
            positions = torch.arange(s.num_prompt_tokens - 1, len(s.input_ids) - 1)
            rows.append(torch.full_like(positions, b))
            cols.append(positions)
        rows_N, cols_N = torch.cat(rows).to(self.device), torch.cat(cols).to(self.device)
        targets_N = input_ids_BT[rows_N, cols_N + 1]
        lm_head = self.model.get_output_embeddings()
        nll_N = torch.empty(len(rows_N), dtype=torch.float32, device=self.device)
        correct_N = torch.empty_like(nll_N)
        for start in range(0, len(rows_N), self.loss_chunk_tokens):
            chunk = slice(start, start + self.loss_chunk_tokens)
            logits_NV = lm_head(hidden_BTD[rows_N[chunk], cols_N[chunk]]).float()
            nll_N[chunk] = F.cross_entropy(logits_NV, targets_N[chunk], reduction="none")
            correct_N[chunk] = (logits_NV.argmax(-1) == targets_N[chunk]).float()
        count_B = torch.zeros(len(samples), dtype=torch.float32, device=self.device)
        count_B.index_add_(0, rows_N, torch.ones_like(nll_N))
        loss_B = torch.zeros_like(count_B).index_add_(0, rows_N, nll_N) / count_B
        return loss_B, torch.zeros_like(count_B).index_add_(0, rows_N, correct_N) / count_B

    def record(self, samples: Sequence[TokenizedSample], *, checkpoint: str, step: int) -> pa.Table:
        """The routing table of `samples` (rows in the given order)."""
        handles = [router.register_forward_hook(self._hook) for _, router in self.routers]
        try:
            routing: list = [None] * len(samples)
            losses = np.zeros(len(samples), dtype=np.float32)
            accuracy = np.zeros(len(samples), dtype=np.float32)
            batches = length_buckets([len(s.input_ids) for s in samples],
                                     max_tokens_per_batch=self.max_tokens_per_batch)
            for batch in batches:
                per_sample, loss_B, accuracy_B = self._record_batch([samples[i] for i in batch])
                for position, i in enumerate(batch):
                    routing[i], losses[i], accuracy[i] = per_sample[position], loss_B[position], accuracy_B[position]
        finally:
            for handle in handles:
                handle.remove()
        table = routing_table(samples, routing, losses, checkpoint=checkpoint, step=step,
                              keep_input_ids=self.keep_input_ids, token_accuracy=accuracy)
        shape = {"num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k}
        return table.replace_schema_metadata({k: str(v) for k, v in shape.items()})


def _list_array(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def routing_table(samples, routing, losses, *, checkpoint: str, step: int, keep_input_ids: bool,
                  token_accuracy=None):
    num_rows = len(samples)
    if token_accuracy is None:
        token_accuracy = np.full(num_rows, np.nan, dtype=np.float32)
    columns = {
        "checkpoint": pa.array([checkpoint] * num_rows, pa.string()),
        "step": pa.array([step] * num_rows, pa.int64()),
        "sample_id": pa.array([s.sample_id for s in samples], pa.string()),
        "group": pa.array([s.group for s in samples], pa.string()),
        "num_tokens": pa.array([len(s.input_ids) for s in samples], pa.int32()),
        "num_prompt_tokens": pa.array([s.num_prompt_tokens for s in samples], pa.int32()),
        "topk_ids": _list_array([ids for ids, _ in routing], pa.int16()),
        "topk_weights": _list_array([w for _, w in routing], pa.float16()),
        "loss": pa.array(losses, pa.float32()),
        "token_accuracy": pa.array(token_accuracy, pa.float32()),
    }
    schema = ROUTING_SCHEMA
    if keep_input_ids:
        columns["input_ids"] = _list_array([s.input_ids.astype(np.int32) for s in samples], pa.int32())
        schema = schema.append(pa.field("input_ids", pa.list_(pa.int32())))
    return pa.table(columns, schema=schema)
