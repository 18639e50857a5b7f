"""Run-directory layout, table writes that are atomic, completion markers, the failures table."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(table: pa.Table | pd.DataFrame, path: Path) -> None:
    """Write a Parquet file atomically (temp file + rename), so readers never see half a table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(table, pd.DataFrame):  # plain Arrow types, no pandas-specific metadata
        table = pa.Table.from_pandas(table, preserve_index=False).replace_schema_metadata(None)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- table schemas

ROUTING_SCHEMA = pa.schema(
    [
        pa.field("checkpoint", pa.string()),
        pa.field("step", pa.int64()),
        pa.field("sample_id", pa.string()),
        pa.field("group", pa.string()),
        pa.field("num_tokens", pa.int32()),  # T, tokens routed
        pa.field("num_prompt_tokens", pa.int32()),  # index of the first scored token (>= 1)
        pa.field("topk_ids", pa.list_(pa.int16())),  # L*T*K, layer-major, router order
        pa.field("topk_weights", pa.list_(pa.float16())),  # matching router weights
        pa.field("loss", pa.float32()),  # mean next-token NLL on the scored tokens
        pa.field("token_accuracy", pa.float32()),  # share of scored tokens that are the greedy argmax
    ]
)
"""One row per sample per checkpoint. An optional `input_ids` column (list<int32>, length T)
follows when the record config keeps token ids (vocabulary specialization needs them)."""

FAILURE_COLUMNS = ["stage", "unit", "error_type", "message", "time"]


# --------------------------------------------------------------------------- run directory


class RunDir:
    """Paths of one sweep's run directory (layout in the README)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.catalog = self.root / "catalog.parquet"
        self.samples = self.root / "samples.parquet"
        self.memorized = self.root / "memorized.parquet"
        self.sample_metrics = self.root / "sample_metrics.parquet"
        self.metrics = self.root / "metrics.parquet"
        self.accuracy = self.root / "accuracy.parquet"
        self.correlations = self.root / "correlations.parquet"
        self.onsets = self.root / "onsets.parquet"
        self.failures = self.root / "failures.parquet"
        self.report = self.root / "report.html"
        self.figures = self.root / "figures"

    def routing_shard(self, checkpoint: str, shard: int) -> Path:
        return self.root / "routing" / checkpoint / f"shard{shard:05d}.parquet"

    def checkpoint_weights(self, checkpoint: str) -> Path:
        """Router weight rows and residue embeddings of a checkpoint, written by the record stage."""
        return self.root / "routing" / checkpoint / "weights.safetensors"

    def eval_items(self, checkpoint: str, benchmark: str) -> Path:
        return self.root / "eval" / checkpoint / f"{benchmark}.parquet"


def done_marker(path: Path) -> Path:
    return path.with_suffix(".done")


def is_done(path: Path, fingerprint: str) -> bool:
    """A unit is done when its output exists and its marker holds the same fingerprint."""
    marker = done_marker(path)
    return path.exists() and marker.exists() and marker.read_text() == fingerprint


def invalidate(path: Path) -> None:
    """Drop a unit's completion marker before recomputing it, so that a failed recompute never
    leaves an older result looking current."""
    done_marker(path).unlink(missing_ok=True)


def mark_done(path: Path, fingerprint: str) -> None:
    marker = done_marker(path)
    tmp = marker.with_suffix(".done.tmp")
    tmp.write_text(fingerprint)
    tmp.replace(marker)


def fingerprint(*parts: object) -> str:
    """A stable hash of everything that determines a unit's result."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def write_failures(run: RunDir, stages: set[str], failures: list[dict]) -> pd.DataFrame:
    """Replace the rows of `stages` in failures.parquet with `failures` (their latest attempt)."""
    table = pd.read_parquet(run.failures) if run.failures.exists() else pd.DataFrame(columns=FAILURE_COLUMNS)
    table = table[~table["stage"].isin(stages)]
    table = pd.concat([table, pd.DataFrame(failures, columns=FAILURE_COLUMNS)], ignore_index=True)
    write_parquet(table.astype({"time": "datetime64[ns, UTC]"}), run.failures)
    return table
