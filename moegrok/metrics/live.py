"""Pathway metrics during training, at zero test cost and with no checkpoint round-trip.

`LiveMetrics(probe, ...)` records the routing of a fixed probe set of training samples on the
live model and reduces it with the same functions as the offline sweep (the recorder, the
pathway features and group rows). Use it from a plain training loop, or add `LiveMetricsCallback` to
a Hugging Face `Trainer`: the metrics then go through `Trainer.log`, i.e. to every configured
reporter (TensorBoard, W&B, ...), and to a Parquet log.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from transformers import TrainerCallback

from moegrok.data.samples import TokenizedSample
from moegrok.metrics.embedding import main_embedding_diff
from moegrok.metrics.table import checkpoint_features, group_rows
from moegrok.routing.recorder import RoutingRecorder, input_embeddings, router_weights
from moegrok.store import write_parquet


class LiveMetrics:
    """Pathway metrics of a probe set on a live model; one row per (step, group)."""

    def __init__(
        self,
        probe: list[TokenizedSample],
        *,
        every: int,
        weight_share: float = 0.7,
        positions: tuple[str, ...] = ("all",),
        max_pairs: int = 2_000_000,
        residue_token_ids: list[int] | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        if every <= 0:
            raise ValueError(f"live metrics every={every!r}: expected > 0")
        self.probe, self.every, self.weight_share = probe, every, weight_share
        self.positions, self.max_pairs = tuple(positions), max_pairs
        self.residue_token_ids = residue_token_ids
        self.log_path = Path(log_path) if log_path else None
        self.rows: list[dict] = []

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def measure(self, model: torch.nn.Module, step: int) -> list[dict]:
        """Rows of metrics at `step`; the model is left in the mode it was in."""
        was_training = model.training
        try:
            table = RoutingRecorder(model).record(self.probe, checkpoint=f"step{step}", step=step)
            routers_LED = router_weights(model).numpy()
            med = (main_embedding_diff(input_embeddings(model, self.residue_token_ids).numpy())
                   if self.residue_token_ids else float("nan"))
        finally:
            model.train(was_training)
        features = checkpoint_features(table, routers_LED, weight_share=self.weight_share,
                                       positions=list(self.positions))
        merged = pd.concat([
            group_rows(members, memorized=None, positions=list(self.positions), max_pairs=self.max_pairs, seed=0,
                       per_layer=False)
            for _, members in features.groupby("group", sort=True)
        ], ignore_index=True).drop(columns=["checkpoint", "sample_set"])
        merged["med"] = med
        rows = merged.to_dict("records")
        self.rows.extend(rows)
        if self.log_path is not None:
            write_parquet(pd.DataFrame(self.rows), self.log_path)
        return rows


class LiveMetricsCallback(TrainerCallback):
    """Runs a LiveMetrics every `live.every` optimizer steps inside a `Trainer`.

        trainer = Trainer(...)
        trainer.add_callback(LiveMetricsCallback(live, trainer))
    """

    def __init__(self, live: LiveMetrics, trainer=None) -> None:
        self.live, self.trainer = live, trainer

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or not self.live.due(state.global_step):
            return control
        rows = self.live.measure(model, state.global_step)
        if self.trainer is not None:
            logs = {f"pathway/{row['group']}/{key}": value for row in rows for key, value in row.items()
                    if key not in ("step", "group") and isinstance(value, int | float)}
            self.trainer.log(logs)
        return control
