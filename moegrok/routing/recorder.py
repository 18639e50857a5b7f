"""RoutingRecorder: a loaded HF MoE model + tokenized samples -> the routing table.

Per token per MoE layer it records the top-k expert ids and weights in router order (highest
weight first) with forward hooks placed by the family's adapter (moegrok/routing/adapters.py), and per
sample the mean next-token NLL on the scored tokens. Every batch's routing is checked before it
is stored: integer ids of shape (tokens, k), 0 <= id < E, no expert twice in a token's top-k,
finite weights that sum to the family's constant where it normalizes them. Full-vocabulary
logits are computed only for scored positions and in chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from moegrok.data.batching import length_buckets, pad_batch
from moegrok.data.samples import TokenizedSample
from moegrok.errors import RoutingError
from moegrok.routing.adapters import MoeAdapter
from moegrok.routing.families import adapter_for
from moegrok.store import ROUTING_SCHEMA

DEFAULT_MAX_TOKENS_PER_BATCH = 16384  # record.max_tokens_per_batch=0 off GPU


def router_weights(model: torch.nn.Module, *, adapter: MoeAdapter | None = None) -> torch.Tensor:
    """The expert embeddings of every MoE layer, (L, E, D) float32 on CPU: the router weight rows.
    An adapter without expert rows gives NaN of shape (L, E, 1), so pathway consistency is NaN."""
    adapter = adapter or adapter_for(model)
    layers = adapter.moe_layers(model)
    num_experts = adapter.num_experts(model.config)
    if adapter.expert_rows is None:
        return torch.full((len(layers), num_experts, 1), float("nan"))
    rows = [adapter.expert_rows(layer).detach().float().cpu() for _, layer in layers]
    for (index, _), rows_ED in zip(layers, rows, strict=True):
        if rows_ED.ndim != 2 or rows_ED.shape != rows[0].shape or rows_ED.shape[0] != num_experts:
            raise RoutingError(f"{type(model).__name__} layer {index}: expert rows of shape {tuple(rows_ED.shape)}, "
                               f"expected ({num_experts}, hidden) in every layer")
    return torch.stack(rows)


def input_embeddings(model: torch.nn.Module, token_ids: Sequence[int]) -> torch.Tensor:
    """Rows of the input embedding matrix for `token_ids`, (N, D) float32 on CPU."""
    weight = model.get_input_embeddings().weight
    return weight.detach()[torch.as_tensor(list(token_ids), device=weight.device)].float().cpu()


def _is_integer(values) -> bool:
    return isinstance(values, torch.Tensor) and not (values.is_floating_point() or values.is_complex()
                                                     or values.dtype == torch.bool)


class RoutingRecorder:
    """Records routing and per-sample loss of one model. Reuse it across sample shards.

    Pipelined: nothing inside a batch waits for the device. The routing checks are reduced on the
    device and checked once per `record` call (a violation fails the whole call, so nothing of it is
    stored); results come back through pinned buffers without blocking (CUDA), and a worker thread
    builds a batch's Arrow table while the next batch runs (`pipeline`: None = on CUDA only, where
    the forward is asynchronous; on CPU the forward holds the cores and the thread only adds switching).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        adapter: MoeAdapter | None = None,
        max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
        loss_chunk_tokens: int = 4096,
        keep_input_ids: bool = False,
        pipeline: bool | None = None,
        decoder: Callable | None = None,
        pad_to: Callable[[int, int], tuple[int, int]] | None = None,
        persistent_hooks: bool = False,
    ) -> None:
        self.model = model.eval()
        self.adapter = adapter or adapter_for(model)
        self.name = type(model).__name__
        self.routers = self.adapter.routers(model)
        if not self.routers:
            raise RoutingError(f"{self.name}: no decoder layer has {self.adapter.hook!r}, so no MoE layers to record")
        self.num_experts = self.adapter.num_experts(model.config)
        self.top_k = self.adapter.top_k(model.config)
        if not 0 < self.top_k <= self.num_experts:
            raise RoutingError(f"{self.name}: top_k={self.top_k} with num_experts={self.num_experts}")
        self.weight_sum = self.adapter.weight_sum(model.config)
        self.max_tokens_per_batch = max_tokens_per_batch
        self.loss_chunk_tokens = loss_chunk_tokens
        self.keep_input_ids = keep_input_ids
        self.device = next(model.parameters()).device
        self.pipeline = self.device.type == "cuda" if pipeline is None else pipeline
        # the decoder call (a compiled one: moegrok/routing/compiled.py) and the padded (batch, length)
        # of a batch; None: the adapter's decoder, padded to the longest sample
        self.decoder = decoder
        self.pad_to = pad_to
        # hooks for the recorder's lifetime (registered before a decoder is compiled, so the graph has them)
        self.persistent_hooks = persistent_hooks
        self._handles = self._register_hooks() if persistent_hooks else []
        self.metadata: dict[str, str] = {}  # extra routing-table metadata (experts implementation, ...)
        self._captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._stats: list[torch.Tensor] = []  # per batch (L, 6) check statistics, on the device
        self._weights_dtype = torch.float32

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def _hook(self, module, args, kwargs, output) -> None:
        self._captured.append(self.adapter.read(module, args, kwargs, output))

    def _where(self) -> list[str]:
        return [f"{self.name} layer {index} ({self.adapter.hook})" for index, _ in self.routers]

    def _checked_routing(self, valid_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids_LNK, weights_LNK) of the batch's N token positions, after checking types and shapes
        now and queuing the value checks (`_raise_on_violations`) at the real tokens, `valid_N`
        (padding may route anyhow). No device sync."""
        if len(self._captured) != self.num_layers:
            raise RoutingError(f"{self.name}: {len(self._captured)} calls of {self.adapter.hook!r} in one forward, "
                               f"expected one per MoE layer ({self.num_layers})")
        for at, (ids, weights) in zip(self._where(), self._captured, strict=True):
            self._check_read(at, ids, weights, num_tokens=len(valid_N))
        self._weights_dtype = self._captured[0][1].dtype
        ids_LNK = torch.stack([ids.long() for ids, _ in self._captured])
        weights_LNK = torch.stack([weights.float() for _, weights in self._captured])
        valid_1N1 = valid_N[None, :, None]
        sorted_LNK = ids_LNK.sort(dim=-1).values
        sums_LN = weights_LNK.sum(-1)
        deviation_LN = ((sums_LN - self.weight_sum).abs() if self.weight_sum is not None
                        else torch.zeros_like(sums_LN)).masked_fill(~valid_N[None], -1.0)
        worst_L1 = deviation_LN.argmax(-1, keepdim=True)
        self._stats.append(torch.stack([
            ids_LNK.masked_fill(~valid_1N1, self.num_experts).amin((1, 2)).double(),
            ids_LNK.masked_fill(~valid_1N1, 0).amax((1, 2)).double(),
            ((sorted_LNK[..., 1:] == sorted_LNK[..., :-1]).any(-1) & valid_N[None]).sum(-1).double(),
            (~weights_LNK.isfinite() & valid_1N1).sum((1, 2)).double(),
            deviation_LN.gather(-1, worst_L1)[:, 0].double(), sums_LN.gather(-1, worst_L1)[:, 0].double(),
        ], 1))
        return ids_LNK, weights_LNK

    def _raise_on_violations(self) -> None:
        """The value checks of every batch since the last call, with one device sync."""
        if not self._stats:
            return
        stats_BL6 = torch.stack(self._stats).cpu()
        self._stats.clear()
        low_L, high_L = stats_BL6[..., 0].amin(0).tolist(), stats_BL6[..., 1].amax(0).tolist()
        repeated_L, nonfinite_L = stats_BL6[..., 2].sum(0).tolist(), stats_BL6[..., 3].sum(0).tolist()
        worst_L = stats_BL6[..., 4].argmax(0)
        deviation_L = stats_BL6[..., 4].amax(0).tolist()
        worst_sum_L = stats_BL6[..., 5].gather(0, worst_L[None])[0].tolist()
        tolerance = abs(self.weight_sum or 0) * (1e-4 + self.top_k * torch.finfo(self._weights_dtype).eps)
        for at, low, high, repeated, nonfinite, deviation, worst_sum in zip(
                self._where(), low_L, high_L, repeated_L, nonfinite_L, deviation_L, worst_sum_L, strict=True):
            if low < 0 or high >= self.num_experts:
                raise RoutingError(f"{at}: top-k ids span {low:.0f}..{high:.0f}, expected 0..{self.num_experts - 1}")
            if repeated:
                raise RoutingError(f"{at}: {repeated:.0f} tokens list an expert twice in their top-{self.top_k}")
            if nonfinite:
                raise RoutingError(f"{at}: {nonfinite:.0f} top-k weights are not finite")
            if deviation > tolerance:
                raise RoutingError(f"{at}: a token's top-k weights sum to {worst_sum:.6g}, expected "
                                   f"{self.weight_sum:g} (this family normalizes them)")

    def _check_read(self, at: str, ids, weights, *, num_tokens: int) -> None:
        """Types and shapes of one layer's read: integer ids and float weights, (tokens, top-k) each."""
        if not _is_integer(ids):
            raise RoutingError(f"{at}: top-k ids are {getattr(ids, 'dtype', type(ids).__name__)}, expected "
                               "integers (does the adapter read the router logits or weights instead?)")
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            raise RoutingError(f"{at}: top-k weights are {getattr(weights, 'dtype', type(weights).__name__)}, "
                               "expected floats")
        expected = (num_tokens, self.top_k)
        if tuple(ids.shape) != expected or tuple(weights.shape) != expected:
            raise RoutingError(f"{at}: ids {tuple(ids.shape)} and weights {tuple(weights.shape)}, expected "
                               f"{expected} each (tokens, top-k)")

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor if self.device.type == "cpu" else tensor.to(self.device)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy that does not wait for the device (CUDA: into a pinned buffer; ready after the
        batch's event)."""
        if self.device.type != "cuda":
            return tensor.cpu()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    @torch.inference_mode()
    def _record_batch(self, samples: list[TokenizedSample]):
        """Host tensors (flat routing: each sample's (L, n, K) block in turn; per-sample loss and accuracy)
        and the CUDA event after which they are filled (None off CUDA). Queues the batch's checks."""
        lengths_B = np.array([len(s.input_ids) for s in samples])
        input_ids_BT, attention_mask_BT = pad_batch(samples)
        if self.pad_to is not None:  # a fixed shape for the compiled decoder: extra rows and columns are padding
            rows, cols = self.pad_to(*input_ids_BT.shape)
            grow = (0, cols - input_ids_BT.shape[1], 0, rows - input_ids_BT.shape[0])
            input_ids_BT, attention_mask_BT = F.pad(input_ids_BT, grow), F.pad(attention_mask_BT, grow)
        batch_size, num_tokens_max = input_ids_BT.shape
        input_ids_BT, attention_mask_BT = self._to_device(input_ids_BT), self._to_device(attention_mask_BT)

        self._captured.clear()
        decoder = self.decoder if self.decoder is not None else self.adapter.decoder(self.model)
        hidden_BTD = decoder(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False
                             ).last_hidden_state
        ids_LNK, weights_LNK = self._checked_routing(attention_mask_BT.bool().flatten())
        self._captured.clear()
        # router order: highest weight first (some routers return unsorted top-k)
        weights_LNK, order_LNK = weights_LNK.sort(dim=-1, descending=True, stable=True)
        ids_LNK = ids_LNK.gather(-1, order_LNK)

        loss_B, accuracy_B = self._sample_losses(hidden_BTD, input_ids_BT, samples)
        # each sample's (L, n, K) block in turn: rows l * N + b * T + t (t < n_b) of the (L * N, K) routing,
        # indexed from the lengths the host knows (a boolean mask would wait for the device)
        num_positions = batch_size * num_tokens_max
        starts_BL = np.arange(len(samples))[:, None] * num_tokens_max + np.arange(self.num_layers) * num_positions
        counts = np.repeat(lengths_B, self.num_layers)
        rows_V = np.repeat(starts_BL.ravel() - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
        rows_V = self._to_device(torch.from_numpy(rows_V))
        num_k = ids_LNK.shape[-1]
        ids = ids_LNK.view(-1, num_k).index_select(0, rows_V).to(torch.int16).flatten()
        weights = weights_LNK.view(-1, num_k).index_select(0, rows_V).to(torch.float16).flatten()
        host = tuple(self._to_host(t) for t in (ids, weights, loss_B, accuracy_B))
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return host, event

    def _sample_losses(self, hidden_BTD, input_ids_BT, samples) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean NLL and greedy (argmax) accuracy of each sample's scored tokens; vocabulary logits
        only for scored positions, in chunks."""
        first_B = np.array([s.num_prompt_tokens - 1 for s in samples])  # position predicting token 1
        count_B = np.array([len(s.input_ids) for s in samples]) - 1 - first_B
        rows_N = np.repeat(np.arange(len(samples)), count_B)
        cols_N = np.arange(len(rows_N)) - np.repeat(np.cumsum(count_B) - count_B - first_B, count_B)
        rows_N, cols_N = self._to_device(torch.from_numpy(rows_N)), self._to_device(torch.from_numpy(cols_N))
        targets_N = input_ids_BT[rows_N, cols_N + 1]
        nll_N = torch.empty(len(rows_N), dtype=torch.float32, device=self.device)
        correct_N = torch.empty_like(nll_N)
        for start in range(0, len(rows_N), self.loss_chunk_tokens):
            chunk = slice(start, start + self.loss_chunk_tokens)
            logits_NV = self.adapter.lm_logits(self.model, hidden_BTD[rows_N[chunk], cols_N[chunk]]).float()
            nll_N[chunk] = F.cross_entropy(logits_NV, targets_N[chunk], reduction="none")
            correct_N[chunk] = (logits_NV.argmax(-1) == targets_N[chunk]).float()
        count_B = self._to_device(torch.from_numpy(count_B)).to(torch.float32)
        loss_B = torch.zeros_like(count_B).index_add_(0, rows_N, nll_N) / count_B
        return loss_B, torch.zeros_like(count_B).index_add_(0, rows_N, correct_N) / count_B

    def _batch_arrays(self, host: tuple[torch.Tensor, ...], event) -> tuple[np.ndarray, ...]:
        if event is not None:
            event.synchronize()
        return tuple(t.numpy() for t in host)

    def _batch_table(self, samples: list[TokenizedSample], host: tuple[torch.Tensor, ...], event, *,
                     checkpoint: str, step: int) -> pa.Table:
        ids, weights, losses, accuracy = self._batch_arrays(host, event)
        return routing_table(samples, ids, weights, losses, checkpoint=checkpoint, step=step,
                             keep_input_ids=self.keep_input_ids, token_accuracy=accuracy)

    def record(self, samples: Sequence[TokenizedSample], *, checkpoint: str, step: int) -> pa.Table:
        """The routing table of `samples` (rows in the given order)."""
        batches = length_buckets([len(s.input_ids) for s in samples], max_tokens_per_batch=self.max_tokens_per_batch,
                                 equal_lengths=self.adapter.pad_free)
        handles = [] if self.persistent_hooks else self._register_hooks()
        self._stats.clear()
        worker = ThreadPoolExecutor(max_workers=1) if self.pipeline else None
        parts = []
        try:
            for batch in batches:
                members = [samples[i] for i in batch]
                host, event = self._record_batch(members)
                if worker:  # batch i's table is built while batch i + 1 runs
                    parts.append(worker.submit(self._batch_table, members, host, event, checkpoint=checkpoint,
                                               step=step))
                else:
                    parts.append(self._batch_arrays(host, event))
            parts = [part.result() for part in parts] if worker else parts
            self._raise_on_violations()  # the one check of this call: nothing is returned before it passes
        finally:
            self._stats.clear()
            if worker:
                worker.shutdown(wait=True, cancel_futures=True)
            for handle in handles:
                handle.remove()
        order = [i for batch in batches for i in batch]
        if worker and parts:
            table = pa.concat_tables(parts).combine_chunks()
        else:  # one table of all batches (no batches: no samples)
            ids, weights, losses, accuracy = [np.concatenate(column) for column in zip(*parts, strict=True)] or [[]] * 4
            table = routing_table([samples[i] for i in order], ids, weights, losses, checkpoint=checkpoint, step=step,
                                  keep_input_ids=self.keep_input_ids, token_accuracy=accuracy if parts else None)
        shape = {"num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
                 **self.metadata}
        return table.take(np.argsort(order)).replace_schema_metadata({k: str(v) for k, v in shape.items()})

    def close(self) -> None:
        """Remove the hooks a persistent-hook recorder left on the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _register_hooks(self) -> list:
        return [router.register_forward_hook(self._hook, with_kwargs=True) for _, router in self.routers]


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
