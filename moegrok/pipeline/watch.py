"""Watch mode: follow a pretraining run by sweeping its checkpoint directory again and again."""

from __future__ import annotations

import time
from pathlib import Path

from moegrok.config import SweepConfig
from moegrok.pipeline.sweep import run_sweep
from moegrok.store import as_path, configure_storage


def run_watch(cfg: SweepConfig) -> int:
    """Sweep the complete checkpoints, wait `watch.poll_s`, sweep again, until the sentinel file
    appears or `watch.timeout_s` passes (then one last sweep). Every round recomputes only what
    is new. Returns the worst exit status of the rounds."""
    configure_storage(cfg.storage.options)
    sentinel = as_path(cfg.watch.sentinel) if cfg.watch.sentinel else None
    if isinstance(sentinel, Path) and not sentinel.is_absolute() and cfg.checkpoints.dir:
        sentinel = as_path(cfg.checkpoints.dir) / str(sentinel)
    deadline = time.monotonic() + cfg.watch.timeout_s if cfg.watch.timeout_s else float("inf")
    status, rounds = 0, 0
    while True:
        last = (sentinel is not None and sentinel.exists()) or time.monotonic() >= deadline
        rounds += 1
        print(f"watch: round {rounds}" + (" (the last)" if last else ""), flush=True)
        status = max(status, run_sweep(cfg))
        if last:
            return status
        time.sleep(cfg.watch.poll_s)
