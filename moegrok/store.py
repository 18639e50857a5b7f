"""Run-directory layout, the one atomic writer, completion markers, fingerprints, failure rows.

Every file a stage produces is written through `atomic_path` (temp file or dir beside the
target, then one rename), so a reader never sees half a table and a killed sweep leaves no
partial output. A unit of work is done when its output exists and its `.done` marker holds
the fingerprint of everything that determined it.

A run directory may also be an object-store URL (s3://bucket/prefix, gs://..., any fsspec
protocol): its paths are then `ObjectPath`s. There is no rename there: a file is one PUT (atomic
for one object), a directory is uploaded file by file, and an output is trusted only once its
marker exists, which is written after it. The run-dir lock becomes a lease object (`lease`).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from moegrok.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- object storage

_OPTIONS: dict[str, Any] = {}  # storage.options of this process (`configure_storage`)
_FILESYSTEMS: dict[tuple[str, str], pafs.FileSystem] = {}
_S3_KEYS = {"endpoint_url": "endpoint_override", "key": "access_key", "secret": "secret_key",
            "token": "session_token", "region": "region", "region_name": "region"}


def configure_storage(options: dict[str, Any] | None) -> None:
    """Set the fsspec-style storage options (storage.options: endpoint_url, key, secret, region,
    ...) URLs are opened with in this process; unset ones come from the usual AWS_* variables."""
    _OPTIONS.clear()
    _OPTIONS.update(options or {})


def is_url(path: object) -> bool:
    return isinstance(path, ObjectPath) or ("://" in str(path) and not str(path).startswith("file://"))


def filesystem(scheme: str, options: dict[str, Any] | None = None) -> pafs.FileSystem:
    """The pyarrow filesystem of a URL scheme: S3 and GCS natively, anything else through fsspec."""
    options = dict(_OPTIONS if options is None else options)
    key = (scheme, json.dumps(options, sort_keys=True, default=str))
    if key not in _FILESYSTEMS:
        if scheme in ("s3", "s3a"):
            unknown = sorted(set(options) - set(_S3_KEYS))
            if unknown:
                raise ConfigError(f"config key storage.options: {unknown} are not S3 options (known: "
                                  f"{sorted(_S3_KEYS)})")
            kwargs = {_S3_KEYS[name]: value for name, value in options.items()}
            if "endpoint_override" not in kwargs and os.environ.get("AWS_ENDPOINT_URL"):
                kwargs["endpoint_override"] = os.environ["AWS_ENDPOINT_URL"]
            if "region" not in kwargs and os.environ.get("AWS_DEFAULT_REGION"):
                kwargs["region"] = os.environ["AWS_DEFAULT_REGION"]
            # delayed open: a small object is one PUT (not a 3-request multipart upload)
            _FILESYSTEMS[key] = pafs.S3FileSystem(allow_delayed_open=True, **kwargs)
        else:
            import fsspec  # gs:// through gcsfs (the `gcs` extra), and every other fsspec protocol

            _FILESYSTEMS[key] = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme, **options)))
    return _FILESYSTEMS[key]


ROOTED_SCHEMES = ("memory", "file", "local")


class _Stat:
    def __init__(self, size: int, mtime_ns: int) -> None:
        self.st_size, self.st_mtime_ns = size, mtime_ns


class ObjectPath:
    """The subset of pathlib.Path the pipeline uses, on an object store: `scheme://bucket/key`."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.scheme, _, rest = str(url).partition("://")
        # the key as the store's filesystem names it: bucket/key; fsspec's memory and local
        # filesystems root theirs at "/"
        self.key = ("/" if self.scheme in ROOTED_SCHEMES else "") + rest.strip("/")
        self.options = dict(_OPTIONS if options is None else options)

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem(self.scheme, self.options)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key.lstrip('/')}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __lt__(self, other: ObjectPath) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(f"{self}/{name}", self.options)

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    @property
    def bucket_and_key(self) -> tuple[str, str]:
        """S3's two halves of the path (boto3 calls take them apart)."""
        bucket, _, key = self.key.partition("/")
        return bucket, key

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(f"{self.scheme}://{self.key.rpartition('/')[0]}", self.options)

    def resolve(self) -> ObjectPath:
        return self

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.key)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> _Stat:
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(self))
        return _Stat(info.size or 0, info.mtime_ns or 0)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store has no directories, only key prefixes."""

    def read_bytes(self) -> bytes:
        """The whole object: on S3 one GET (pyarrow's stream would HEAD it first)."""
        if self.scheme in ("s3", "s3a"):
            bucket, key = self.bucket_and_key
            client = s3_client(self.options)
            try:
                return client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except client.exceptions.NoSuchKey:
                raise FileNotFoundError(str(self)) from None
        try:
            with self.fs.open_input_stream(self.key) as f:
                return f.read()
        except OSError as e:
            if not self.exists():
                raise FileNotFoundError(str(self)) from e
            raise

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """One PUT: the object appears whole or not at all."""
        with self.fs.open_output_stream(self.key) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.key)
        except (FileNotFoundError, OSError):
            if not missing_ok and not self.exists():
                raise FileNotFoundError(str(self)) from None

    def open(self, mode: str = "rb") -> io.IOBase:
        """The object read whole (sample and benchmark files), as a file."""
        if mode == "rb":
            return io.BytesIO(self.read_bytes())
        if mode == "r":
            return io.StringIO(self.read_text())
        raise ValueError(f"{self}: objects are opened for reading only (mode {mode!r})")

    def listing(self, *, recursive: bool = False) -> list[pafs.FileInfo]:
        """What is under this prefix, in one LIST (paged by the store)."""
        return self.fs.get_file_info(pafs.FileSelector(self.key, allow_not_found=True, recursive=recursive))

    def iterdir(self) -> Iterator[ObjectPath]:
        for info in self.listing():
            yield ObjectPath(f"{self.scheme}://{info.path}", self.options)

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        if "/" in pattern:
            raise ValueError(f"{self}: only patterns of one level are supported on object storage ({pattern!r})")
        return (path for path in self.iterdir() if fnmatch.fnmatch(path.name, pattern))

    def rmtree(self) -> None:
        if self.exists():
            self.fs.delete_dir_contents(self.key, missing_dir_ok=True)

    def download(self, destination: Path) -> Path:
        """Copy this object, or every object under this prefix, to a local path."""
        (destination.parent if self.is_file() else destination).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.key, str(destination), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return destination


AnyPath = Path | ObjectPath


def as_path(path: str | Path | ObjectPath, options: dict[str, Any] | None = None) -> AnyPath:
    """A local Path, or an ObjectPath for an object-store URL."""
    if isinstance(path, Path | ObjectPath):
        return path
    if str(path).startswith("file://"):
        return Path(str(path)[len("file://"):])
    return ObjectPath(str(path), options) if is_url(path) else Path(path)


def read_parquet(path: str | AnyPath, columns: list[str] | None = None, **kwargs: Any) -> pd.DataFrame:
    """pd.read_parquet of a local path or of a URL (with this process's storage options)."""
    path = as_path(path)
    if isinstance(path, ObjectPath):
        return read_table(path, columns=columns).to_pandas(**kwargs)
    return pd.read_parquet(path, columns=columns, **kwargs)


def read_table(path: str | AnyPath | list[str | AnyPath], columns: list[str] | None = None,
               **kwargs: Any) -> pa.Table:
    """pq.read_table of a local path, a URL, or a list of either (one dataset)."""
    paths = [as_path(p) for p in path] if isinstance(path, list) else [as_path(path)]
    if not (paths and isinstance(paths[0], ObjectPath)):
        return pq.read_table([str(p) for p in paths] if isinstance(path, list) else paths[0], columns=columns,
                             **kwargs)
    if not isinstance(path, list) and not paths[0].is_dir():  # one GET of the whole table
        return pq.read_table(pa.BufferReader(paths[0].read_bytes()), columns=columns, **kwargs)
    table = dataset(paths if isinstance(path, list) else paths[0]).to_table(filter=_filter(kwargs.pop("filters", None)))
    return table if columns is None else table.select(columns)


def _filter(filters: list[tuple] | None) -> Any:
    return None if filters is None else pq.filters_to_expression(filters)


def load_safetensors(path: str | AnyPath) -> dict:
    """safetensors.numpy.load_file of a local path or a URL."""
    from safetensors.numpy import load, load_file

    path = as_path(path)
    return load(path.read_bytes()) if isinstance(path, ObjectPath) else load_file(path)


def dataset(path: str | AnyPath | list[AnyPath]) -> ds.Dataset:
    """A Parquet dataset of a directory (or a list of files), local or on an object store."""
    paths = path if isinstance(path, list) else [as_path(path)]
    if paths and isinstance(paths[0], ObjectPath):
        if isinstance(path, list):
            source = [p.key for p in paths]
        else:  # the Parquet files under the prefix, from one listing (hidden markers left out)
            source = sorted(info.path for info in paths[0].listing(recursive=True) if info.path.endswith(".parquet")
                            and not info.base_name.startswith((".", "_")))
        # each file in one GET (a file dataset would HEAD it and read its footer apart): the Parquet
        # files of a directory or a unit's inputs are what the unit reads whole anyway
        tables = [pq.read_table(pa.BufferReader(ObjectPath(f"{paths[0].scheme}://{key}", paths[0].options)
                                                .read_bytes())) for key in source]
        return ds.dataset(pa.concat_tables(tables, promote_options="default") if tables else pa.table({}))
    return ds.dataset(str(paths[0]) if not isinstance(path, list) else [str(p) for p in paths], format="parquet")

# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(final: str | AnyPath, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temp file (or dir) beside `final`; when the block succeeds it replaces `final` in
    one rename, when it fails nothing of it is left. On an object store the temp is local and is
    uploaded when the block succeeds (one PUT per file; a directory is trusted by its marker)."""
    final = as_path(final)
    if isinstance(final, ObjectPath):
        with tempfile.TemporaryDirectory(prefix="moegrok-upload-") as local:
            tmp = Path(local) / final.name
            if directory:
                tmp.mkdir()
            yield tmp
            if directory:
                final.rmtree()
                for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
                    (final / str(file.relative_to(tmp))).write_bytes(file.read_bytes())
            else:
                final.write_bytes(tmp.read_bytes())
        return
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


def write_bytes(data: bytes, path: str | AnyPath) -> None:
    path = as_path(path)
    if isinstance(path, ObjectPath):
        path.write_bytes(data)  # one PUT
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(text: str, path: str | AnyPath) -> None:
    write_bytes(text.encode(), path)


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
    path = as_path(path)
    if isinstance(path, ObjectPath):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        path.write_bytes(sink.getvalue().to_pybytes())  # one PUT
        return
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_metadata(path: str | AnyPath) -> dict[bytes, bytes]:
    """A Parquet table's schema metadata, read from its footer (on an object store: ranged GETs of
    the footer, not the whole object)."""
    path = as_path(path)
    if isinstance(path, ObjectPath):
        with path.fs.open_input_file(path.key) as file:
            return pq.read_schema(file).metadata or {}
    return pq.read_schema(path).metadata or {}


def read_tags(path: str | AnyPath) -> dict:
    """The "moegrok" tags of a table written by `write_parquet` ({} if none, or no table)."""
    path = as_path(path)
    if not path.exists():
        return {}
    if isinstance(path, ObjectPath):  # tagged tables are small: one GET of the whole object
        metadata = pq.read_schema(pa.BufferReader(path.read_bytes())).metadata or {}
    else:
        metadata = read_metadata(path)
    return json.loads(metadata.get(b"moegrok", b"{}"))


# --------------------------------------------------------------------------- completion markers


def fingerprint(*parts: object) -> str:
    """A stable hash of everything that determines a unit's result."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def done_marker(path: AnyPath) -> AnyPath:
    """`.<name>.done` beside the output: hidden, so a directory of Parquet outputs reads as one
    dataset (pyarrow and pandas skip names starting with ".")."""
    path = as_path(path)
    return path.parent / f".{path.name}.done"


_LISTED: dict[AnyPath, dict | None] = {}  # markers read by `read_markers` for the current stage


def read_markers(paths: list[AnyPath]) -> None:
    """Read the markers of many outputs at once: on an object store one LIST per directory and a
    GET per marker that exists (not a HEAD per output and marker); `_marker` then answers from
    what was read until the next call."""
    _LISTED.clear()
    by_parent: dict[ObjectPath, list[ObjectPath]] = {}
    for path in paths:
        if isinstance(path, ObjectPath):
            by_parent.setdefault(path.parent, []).append(path)
    for parent, outputs in by_parent.items():
        present = {info.path.rpartition("/")[2] for info in parent.listing()}
        for output in outputs:
            _LISTED[output] = None
            if output.name in present and f".{output.name}.done" in present:
                _LISTED[output] = _parse_marker(done_marker(output).read_text())


def _parse_marker(text: str) -> dict:
    try:
        return json.loads(text)
    except ValueError:  # a marker of an older layout: a bare fingerprint
        return {"fingerprint": text, "inputs": {}}


def _marker(path: AnyPath) -> dict | None:
    """The marker of a finished unit: {"fingerprint", "inputs": name -> short hash}; None if the
    output or its marker is missing."""
    path = as_path(path)
    if path in _LISTED:
        return _LISTED[path]
    marker = done_marker(path)
    if isinstance(path, ObjectPath):  # the marker first: it is written last
        try:
            text = marker.read_text()
        except FileNotFoundError:
            return None
        return _parse_marker(text) if path.exists() else None
    if not (path.exists() and marker.exists()):
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


def invalidate(path: AnyPath) -> None:
    """Drop a unit's completion marker before recomputing it, so that a failed recompute never
    leaves an older result looking current."""
    _LISTED.pop(as_path(path), None)
    done_marker(path).unlink(missing_ok=True)


def mark_done(path: AnyPath, inputs: dict[str, object]) -> None:
    """Mark `path` as computed from `inputs` (named, so a later run can say what changed)."""
    _LISTED.pop(as_path(path), None)
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


LEASE_TTL_S = 120.0  # storage.lease_ttl_s


_S3_CLIENTS: dict[str, Any] = {}


def s3_client(options: dict[str, Any]) -> Any:
    """A boto3 S3 client with fsspec-style options (unset ones from the AWS_* variables)."""
    key = json.dumps(options, sort_keys=True, default=str)
    if key not in _S3_CLIENTS:
        import boto3

        _S3_CLIENTS[key] = boto3.client(
            "s3", endpoint_url=options.get("endpoint_url") or None, aws_access_key_id=options.get("key"),
            aws_secret_access_key=options.get("secret"), aws_session_token=options.get("token"),
            region_name=options.get("region") or options.get("region_name"))
    return _S3_CLIENTS[key]


def _holder() -> str:
    since = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"pid {os.getpid()} on {socket.gethostname()}, since {since}"


class Lease:
    """A lease object on an object store: created only if absent (S3: a PUT with If-None-Match: *),
    rewritten by its holder every ttl/3 with a new expiry, deleted at the end. A lease whose expiry
    has passed (its holder died) is taken over. On S3 the takeover and every renewal are PUTs with
    If-Match on the ETag last seen, so of two sweeps taking over one expired lease only one wins, and
    a holder that was paused past its expiry finds its lease gone instead of overwriting the new
    holder's."""

    def __init__(self, path: ObjectPath, ttl_s: float) -> None:
        self.path, self.ttl_s = path, ttl_s
        self.token = uuid.uuid4().hex
        self.holder = _holder()
        self.etag: str | None = None
        self._stop = threading.Event()

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "token": self.token, "expires": time.time() + self.ttl_s}).encode()

    def _conditional_put(self, **condition: str) -> bool:
        """S3: PUT the lease under `condition` (IfNoneMatch / IfMatch); False when it does not hold."""
        from botocore.exceptions import ClientError

        bucket, key = self.path.bucket_and_key
        try:
            self.etag = s3_client(self.path.options).put_object(Bucket=bucket, Key=key, Body=self._body(),
                                                                **condition)["ETag"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def _read(self) -> tuple[dict[str, Any], str | None] | None:
        """The lease held now and its ETag (S3), or None when there is none (or it is half-written)."""
        try:
            if self.path.scheme in ("s3", "s3a"):
                bucket, key = self.path.bucket_and_key
                got = s3_client(self.path.options).get_object(Bucket=bucket, Key=key)
                return json.loads(got["Body"].read()), got["ETag"]
            return json.loads(self.path.read_text()), None
        except (FileNotFoundError, ValueError):
            return None
        except Exception as e:  # botocore's NoSuchKey
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def _create(self) -> bool:
        """Write the lease only if there is none; False when there is one."""
        if self.path.scheme in ("s3", "s3a"):
            return self._conditional_put(IfNoneMatch="*")
        # other stores: write if absent, then read back that the lease is ours (a narrow race)
        if self.path.exists():
            return False
        self.path.write_bytes(self._body())
        return json.loads(self.path.read_text()).get("token") == self.token

    def _take_over(self, etag: str | None) -> bool:
        """Replace an expired lease: on S3 only if it is still the one read (If-Match)."""
        if etag is not None:
            return self._conditional_put(IfMatch=etag)
        self.path.unlink(missing_ok=True)
        return self._create()

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                break
            held = self._read()
            if held is None:
                continue  # released (or half-written) meanwhile: try again
            lease, etag = held
            left = float(lease.get("expires", 0)) - time.time()
            if left > 0:
                raise UserError(f"run dir {self.path.parent} is in use by another sweep ({lease.get('holder')}); "
                                f"its lease expires in {left:.0f} s unless renewed (storage.lease_ttl_s): wait "
                                "for it to finish or choose another run_dir")
            if self._take_over(etag):  # expired: its holder died
                break
        else:
            raise UserError(f"run dir {self.path.parent}: another sweep took the lease {self.path.name} meanwhile; "
                            "choose another run_dir or wait")
        threading.Thread(target=self._renew, daemon=True, name="moegrok-lease").start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if self.etag is None:
                    self.path.write_bytes(self._body())
                elif not self._conditional_put(IfMatch=self.etag):
                    log.error("run dir %s: this sweep's lease %s was taken over after it expired (paused for "
                              "more than storage.lease_ttl_s=%s s?); another sweep may now write here",
                              self.path.parent, self.path.name, self.ttl_s)
                    return
            except Exception as e:  # a network blip: the next renewal tries again before it expires
                log.warning("run dir %s: renewing the lease failed (%s); retrying", self.path.parent, e)

    def release(self) -> None:
        self._stop.set()
        held = self._read()
        if held is not None and held[0].get("token") == self.token:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def lease(path: ObjectPath, ttl_s: float = LEASE_TTL_S) -> Iterator[None]:
    """Hold a lease object for the block (see `Lease`)."""
    held = Lease(path, ttl_s)
    held.acquire()
    try:
        yield
    finally:
        held.release()


@contextlib.contextmanager
def run_lock(root: AnyPath, *, lease_ttl_s: float = LEASE_TTL_S) -> Iterator[None]:
    """Hold a run directory for one sweep: a second sweep started on it stops at once, naming the
    first (the lock goes with the process, also when it is killed). On an object store the lock
    is the lease object `.lease`, which expires `lease_ttl_s` after its holder stops renewing it."""
    root = as_path(root)
    if isinstance(root, ObjectPath):
        with lease(root / ".lease", lease_ttl_s):
            yield
        return
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
        lock.write(_holder())
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)



class RunDir:
    """Paths of one sweep's run directory (layout in the README, "Run directory")."""

    def __init__(self, root: str | AnyPath, options: dict[str, Any] | None = None) -> None:
        self.root = as_path(root, options)
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

    @property
    def is_url(self) -> bool:
        return isinstance(self.root, ObjectPath)

    def routing_shard(self, checkpoint: str, shard: int) -> AnyPath:
        return self.root / "routing" / checkpoint / f"shard{shard:05d}.parquet"

    def checkpoint_weights(self, checkpoint: str) -> AnyPath:
        """Router weight rows and residue embeddings of a checkpoint, written by the record stage."""
        return self.root / "routing" / checkpoint / "weights.safetensors"

    def tuned(self, checkpoint: str) -> AnyPath:
        """The LoRA-merged model dir of a checkpoint (tune stage); its checkpoint name in the sweep
        is `<checkpoint>+tuned`."""
        return self.root / "tuned" / f"{checkpoint}{TUNED_SUFFIX}"

    def eval_items(self, checkpoint: str, benchmark: str) -> AnyPath:
        return self.root / "eval" / checkpoint / f"{benchmark}.parquet"

    def write_failures(self, stages: set[str], failures: list[dict]) -> pd.DataFrame:
        """Replace the rows of `stages` in failures.parquet with `failures` (their latest attempt)."""
        table = read_parquet(self.failures) if self.failures.exists() else pd.DataFrame(columns=FAILURE_COLUMNS)
        table = table[~table["stage"].isin(stages)]
        table = pd.concat([table, pd.DataFrame(failures, columns=FAILURE_COLUMNS)], ignore_index=True)
        write_parquet(table.astype({"time": "datetime64[ns, UTC]"}), self.failures)
        return table
