"""Run-directory layout, the one atomic writer, completion markers, fingerprints, failure rows.

Every file a stage produces is written through `atomic_path` (temp file or dir beside the
target, then one rename), so a reader never sees half a table and a killed sweep leaves no
partial output. A unit of work is done when its output exists and its `.done` marker holds
the fingerprint of everything that determined it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moegrok.errors import UserError

# --------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(final: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temp file (or dir) beside `final`; when the block succeeds it replaces `final` in
    one rename, when it fails nothing of it is left."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    tmp.chmod(0o755 if directory else 0o644)  # mkstemp/mkdtemp make it private
    try:
        yield tmp
        if directory and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_bytes(data: bytes, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _plain_type(dtype: pa.DataType) -> pa.DataType:
    """string for large_string (pandas' str dtype converts to it), also inside lists; a list of
    numbers that are all missing (NaN) is inferred as list<null>: it is list<double>."""
    if pa.types.is_large_string(dtype):
        return pa.string()
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        value_type = dtype.value_type
        return pa.list_(pa.float64() if pa.types.is_null(value_type) else _plain_type(value_type))
    return dtype


def write_parquet(table: pa.Table | pd.DataFrame, path: str | Path, *, tags: dict | None = None) -> None:
    """Write a Parquet file atomically. A DataFrame is stored with plain Arrow types (no
    pandas-specific metadata, string not large_string), so a table reads the same whichever
    pandas wrote it. `tags` (JSON) go into the schema metadata under "moegrok" (`read_tags`)."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False).replace_schema_metadata(None)
        table = table.cast(pa.schema([field.with_type(_plain_type(field.type)) for field in table.schema]))
    if tags is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"moegrok": json.dumps(tags)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_tags(path: str | Path) -> dict:
    """The "moegrok" tags of a table written by `write_parquet` ({} if none, or no table)."""
    if not Path(path).exists():
        return {}
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata.get(b"moegrok", b"{}"))


# --------------------------------------------------------------------------- completion markers


def fingerprint(*parts: object) -> str:
    """A stable hash of everything that determines a unit's result."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def done_marker(path: Path) -> Path:
    """`.<name>.done` beside the output: hidden, so a directory of Parquet outputs reads as one
    dataset (pyarrow and pandas skip names starting with ".")."""
    path = Path(path)
    return path.parent / f".{path.name}.done"


def _marker(path: Path) -> dict | None:
    """The marker of a finished unit: {"fingerprint", "inputs": name -> short hash}; None if the
    output or its marker is missing."""
    marker = done_marker(path)
    if not (Path(path).exists() and marker.exists()):
        return None
    text = marker.read_text()
    try:
        return json.loads(text)
    except ValueError:  # a marker of an older layout: a bare fingerprint
        return {"fingerprint": text, "inputs": {}}


def done_fingerprint(path: Path) -> str | None:
    """The fingerprint a finished unit was computed with (None: not finished)."""
    marker = _marker(path)
    return None if marker is None else marker["fingerprint"]


def is_done(path: Path, fingerprint: str) -> bool:
    """A unit is done when its output exists and its marker holds the same fingerprint."""
    return done_fingerprint(path) == fingerprint


def input_hashes(inputs: dict[str, object]) -> dict[str, str]:
    return {name: fingerprint(value)[:16] for name, value in inputs.items()}


def changed_inputs(path: Path, inputs: dict[str, object]) -> list[str]:
    """Why a unit is not current: the names of the inputs that differ from the ones its output was
    computed with, or ["new"] when there is no finished output."""
    marker = _marker(path)
    if marker is None:
        return ["new"]
    before, now = marker.get("inputs", {}), input_hashes(inputs)
    return sorted(name for name in before.keys() | now.keys() if before.get(name) != now.get(name)) or ["format"]


def invalidate(path: Path) -> None:
    """Drop a unit's completion marker before recomputing it, so that a failed recompute never
    leaves an older result looking current."""
    done_marker(path).unlink(missing_ok=True)


def mark_done(path: Path, inputs: dict[str, object]) -> None:
    """Mark `path` as computed from `inputs` (named, so a later run can say what changed)."""
    write_text(json.dumps({"fingerprint": fingerprint(inputs), "inputs": input_hashes(inputs)}), done_marker(path))


# --------------------------------------------------------------------------- failures

FAILURE_COLUMNS = ["stage", "unit", "kind", "error_type", "message", "stack", "time"]
FAILURE_KINDS = ("unit", "record")  # a unit of work that failed; a bad input record (a line, an item) left out
TUNED_SUFFIX = "+tuned"  # a tuned checkpoint `<name>+tuned` is evaluated beside `<name>`
MESSAGE_CHARS = 500


def one_line(text: str) -> str:
    """The first non-empty line of a message, whitespace collapsed, at most MESSAGE_CHARS."""
    line = next((line for line in str(text).splitlines() if line.strip()), "")
    line = " ".join(line.split())
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 3] + "..."


def failure_row(stage: str, unit: str, error_type: str, message: str, *, stack: str = "",
                kind: str = "unit") -> dict:
    """One row of failures.parquet: a one-line message a user reads, the stack (if any) apart."""
    return {"stage": stage, "unit": unit, "kind": kind, "error_type": error_type, "message": one_line(message),
            "stack": stack[-4000:], "time": pd.Timestamp.now(tz="UTC")}


def error_fields(exc: BaseException) -> dict:
    """error_type, the one-line message and the traceback of an exception."""
    return {"error_type": type(exc).__name__, "message": one_line(str(exc) or type(exc).__name__),
            "stack": "".join(traceback.format_exception(exc))[-4000:]}


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


# --------------------------------------------------------------------------- run directory


@contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """Hold a run directory for one sweep: a second sweep started on it stops at once, naming the
    first (the lock goes with the process, also when it is killed)."""
    with open(Path(root) / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise UserError(f"run dir {root} is in use by another sweep ({holder}); wait for it to finish or "
                            "choose another run_dir") from None
        lock.seek(0)
        lock.truncate()
        since = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d %H:%M:%S UTC")
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {since}")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)



class RunDir:
    """Paths of one sweep's run directory (layout in the README, "Run directory")."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.catalog = self.root / "catalog.parquet"
        self.samples = self.root / "samples.parquet"
        self.memorized = self.root / "memorized.parquet"
        self.sample_metrics = self.root / "sample_metrics"  # a directory: one Parquet file per routing shard
        self.metrics = self.root / "metrics.parquet"
        self.routing_analyses = self.root / "routing_analyses.parquet"
        self.coactivation = self.root / "coactivation.parquet"
        self.domain_specialization = self.root / "domain_specialization.parquet"
        self.accuracy = self.root / "accuracy.parquet"
        self.correlations = self.root / "correlations.parquet"
        self.onsets = self.root / "onsets.parquet"
        self.contrast = self.root / "contrast.parquet"  # between-group contrast (moegrok/analysis/contrast.py)
        self.verdicts = self.root / "verdicts.parquet"  # the calibrated rules' claims (moegrok/analysis/verdicts.py)
        self.failures = self.root / "failures.parquet"
        self.stages = self.root / "stages.parquet"  # the last invocation's per-stage summary
        self.report = self.root / "report.html"
        self.figures = self.root / "figures"

    def routing_shard(self, checkpoint: str, shard: int) -> Path:
        return self.root / "routing" / checkpoint / f"shard{shard:05d}.parquet"

    def checkpoint_weights(self, checkpoint: str) -> Path:
        """Router weight rows and residue embeddings of a checkpoint, written by the record stage."""
        return self.root / "routing" / checkpoint / "weights.safetensors"

    def tuned(self, checkpoint: str) -> Path:
        """The LoRA-merged model dir of a checkpoint (tune stage); its checkpoint name in the sweep
        is `<checkpoint>+tuned`."""
        return self.root / "tuned" / f"{checkpoint}{TUNED_SUFFIX}"

    def eval_items(self, checkpoint: str, benchmark: str) -> Path:
        return self.root / "eval" / checkpoint / f"{benchmark}.parquet"

    def write_failures(self, stages: set[str], failures: list[dict]) -> pd.DataFrame:
        """Replace the rows of `stages` in failures.parquet with `failures` (their latest attempt)."""
        table = pd.read_parquet(self.failures) if self.failures.exists() else pd.DataFrame(columns=FAILURE_COLUMNS)
        table = table[~table["stage"].isin(stages)]
        table = pd.concat([table, pd.DataFrame(failures, columns=FAILURE_COLUMNS)], ignore_index=True)
        write_parquet(table.astype({"time": "datetime64[ns, UTC]"}), self.failures)
        return table
