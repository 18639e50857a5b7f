import json
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moegrok.errors import ConfigError, UserError
from moegrok.store import (
    Lease,
    RunDir,
    as_path,
    atomic_path,
    changed_inputs,
    dataset,
    done_fingerprint,
    done_marker,
    error_fields,
    failure_row,
    fingerprint,
    invalidate,
    is_done,
    mark_done,
    read_markers,
    read_parquet,
    read_tags,
    run_lock,
    write_parquet,
)


def test_atomic_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "t.parquet"
    write_parquet(pd.DataFrame({"a": [1, 2]}), target)
    assert pq.read_table(target).to_pydict() == {"a": [1, 2]}
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a table")
        raise RuntimeError("killed mid-write")
    assert pq.read_table(target).to_pydict() == {"a": [1, 2]}  # the old table, intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["t.parquet"]  # no temp file left


def test_a_table_reads_the_same_whichever_pandas_wrote_it(tmp_path):
    frame = pd.DataFrame({"name": pd.array(["a", "b"], dtype="str"), "layers": [[float("nan")] * 3, [1.0, 2.0]]})
    write_parquet(frame, tmp_path / "t.parquet")
    schema = pq.read_schema(tmp_path / "t.parquet")
    assert schema.field("name").type == pa.string() and schema.field("layers").type == pa.list_(pa.float64())
    alone = pd.DataFrame({"layers": [[float("nan")] * 4]})  # all missing: pandas leaves the type open
    write_parquet(alone, tmp_path / "u.parquet")
    assert pq.read_schema(tmp_path / "u.parquet").field("layers").type == pa.list_(pa.float64())


def test_atomic_dir_replaces_an_existing_dir(tmp_path):
    target = tmp_path / "model"
    for content in ("old", "new"):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "weights").write_text(content)
    assert (target / "weights").read_text() == "new" and len(list(tmp_path.iterdir())) == 1
    assert oct(target.stat().st_mode & 0o777) == "0o755"


def test_markers_hold_the_fingerprint_and_are_hidden(tmp_path):
    output = tmp_path / "shard00000.parquet"
    inputs_a = {"checkpoint": "c", "metrics.weight_share": 0.7}
    inputs_b = {"checkpoint": "c", "metrics.weight_share": 0.5}
    print_a, print_b = fingerprint(inputs_a), fingerprint(inputs_b)
    assert print_a == fingerprint({"metrics.weight_share": 0.7, "checkpoint": "c"}) and print_a != print_b
    assert done_marker(output).name == ".shard00000.parquet.done"
    assert not is_done(output, print_a) and changed_inputs(output, inputs_a) == ["new"]
    write_parquet(pd.DataFrame({"a": [1]}), output)
    assert not is_done(output, print_a) and done_fingerprint(output) is None  # written but not marked
    mark_done(output, inputs_a)
    assert is_done(output, print_a) and not is_done(output, print_b) and done_fingerprint(output) == print_a
    assert changed_inputs(output, inputs_b) == ["metrics.weight_share"]
    assert changed_inputs(output, {**inputs_a, "samples": "s"}) == ["samples"]
    assert pd.read_parquet(tmp_path).shape == (1, 1)  # the directory reads as a dataset: markers are skipped
    invalidate(output)
    assert not is_done(output, print_a) and output.exists()
    os.remove(output)
    mark_done(output, inputs_a)
    assert not is_done(output, print_a)  # a marker without its output is not done


def test_tables_carry_tags(tmp_path):
    path = tmp_path / "metrics.parquet"
    assert read_tags(path) == {}
    write_parquet(pd.DataFrame({"step": [1]}), path, tags={"reduce": "abc", "config": "run_dir: x\n"})
    assert read_tags(path) == {"reduce": "abc", "config": "run_dir: x\n"}
    assert pd.read_parquet(path)["step"].tolist() == [1]


def test_a_second_sweep_on_a_run_dir_is_refused_naming_the_first(tmp_path):
    refused = pytest.raises(UserError, match=rf"run dir {tmp_path} is in use by another sweep \(pid {os.getpid()}")
    with run_lock(tmp_path), refused, run_lock(tmp_path):
        pass
    with run_lock(tmp_path):  # released with the first sweep
        pass


def test_failures_replace_a_stage_latest_attempt(tmp_path):
    run = RunDir(tmp_path)
    try:
        raise ValueError("bad shard")
    except ValueError as e:
        fields = error_fields(e)
    assert fields["error_type"] == "ValueError" and fields["message"] == "bad shard"  # one line, no frames
    assert "test_failures_replace" in fields["stack"]  # the traceback, in its own column, names where
    run.write_failures({"record"}, [failure_row("record", "step0/shard00000", **fields),
                                    failure_row("record", "step1/shard00000", **fields)])
    run.write_failures({"evaluate"}, [failure_row("evaluate", "step0/heldout", "OSError", "x" * 5000)])
    run.write_failures({"record"}, [failure_row("record", "step1/shard00000", **fields)])
    table = pd.read_parquet(run.failures)
    assert table[["stage", "unit"]].values.tolist() == [["evaluate", "step0/heldout"],
                                                         ["record", "step1/shard00000"]]
    assert table["message"].str.len().max() == 500 and str(table["time"].dtype) == "datetime64[ns, UTC]"
    assert (table["kind"] == "unit").all() and "raise ValueError" in table.loc[1, "stack"]


# --------------------------------------------------------------------------- object storage (S3 on loopback)


@pytest.fixture
def bucket_run(s3_endpoint, request) -> RunDir:
    """A fresh run dir in the loopback S3 bucket."""
    return RunDir(f"s3://moegrok/store/{request.node.name}")


def test_tables_markers_and_failures_on_s3(bucket_run):
    run = bucket_run
    output = run.routing_shard("step0", 0)
    assert str(output) == f"{run.root}/routing/step0/shard00000.parquet"
    write_parquet(pd.DataFrame({"a": [1, 2]}), output, tags={"step": 0})
    assert read_parquet(output)["a"].tolist() == [1, 2] and read_tags(output) == {"step": 0}
    assert not is_done(output, fingerprint({"x": 1}))  # the output alone is not trusted
    mark_done(output, {"x": 1})
    assert is_done(output, fingerprint({"x": 1})) and changed_inputs(output, {"x": 2}) == ["x"]
    other = run.routing_shard("step0", 1)
    write_parquet(pd.DataFrame({"a": [3]}), other)  # written, never marked: a unit killed before its marker
    read_markers([output, other, run.routing_shard("step3", 0)])  # one LIST per directory
    assert done_fingerprint(output) == fingerprint({"x": 1}) and done_fingerprint(other) is None
    assert done_fingerprint(run.routing_shard("step3", 0)) is None
    invalidate(output)
    assert done_fingerprint(output) is None and not done_marker(output).exists()
    assert sorted(p.name for p in (run.root / "routing" / "step0").glob("*.parquet")) == [
        "shard00000.parquet", "shard00001.parquet"]  # markers are hidden, not parquet
    assert dataset(run.root / "routing" / "step0").to_table().num_rows == 3
    run.write_failures({"record"}, [failure_row("record", "step0/shard00000", "OSError", "gone")])
    assert read_parquet(run.failures)["unit"].tolist() == ["step0/shard00000"]


def test_an_atomic_dir_is_uploaded_whole(bucket_run):
    target = bucket_run.tuned("step6")
    with atomic_path(target, directory=True) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "sub"]
    with pytest.raises(RuntimeError), atomic_path(target / "x.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not (target / "x.txt").exists()  # a failed block uploads nothing


def test_the_lease_refuses_a_second_sweep_and_expires_with_its_holder(bucket_run):
    root = bucket_run.root
    refused = pytest.raises(UserError, match=rf"run dir {root} is in use by another sweep \(pid {os.getpid()}"
                                             r".*lease expires in \d+ s")
    with run_lock(root, lease_ttl_s=30), refused, run_lock(root, lease_ttl_s=30):
        pass
    assert not (root / ".lease").exists()  # released with the first sweep
    with run_lock(root):
        pass
    # a holder killed without releasing: its lease stands until the ttl passes, then it is taken over
    (root / ".lease").write_text(json.dumps({"holder": "pid 1 on gone", "token": "t", "expires": time.time() + 1}))
    with pytest.raises(UserError, match="pid 1 on gone"), run_lock(root):
        pass
    time.sleep(1.2)
    with run_lock(root):
        assert json.loads((root / ".lease").read_text())["holder"].startswith(f"pid {os.getpid()}")


def test_the_lease_is_renewed_while_held(bucket_run):
    lease_path = bucket_run.root / ".lease"
    with run_lock(bucket_run.root, lease_ttl_s=0.6):
        first = json.loads(lease_path.read_text())["expires"]
        time.sleep(0.9)  # past its first ttl: the holder renewed it
        assert json.loads(lease_path.read_text())["expires"] > first
        with pytest.raises(UserError, match="in use by another sweep"), run_lock(bucket_run.root):
            pass


def test_an_expired_lease_goes_to_one_sweep_and_its_old_holder_cannot_renew_it(bucket_run):
    path = bucket_run.root / ".lease"
    paused = Lease(path, ttl_s=0.5)
    assert paused._create()  # a holder that then stops renewing (paused, not dead)
    time.sleep(0.6)
    expired, etag = paused._read()
    assert expired["token"] == paused.token and expired["expires"] < time.time()
    first, second = Lease(path, ttl_s=30), Lease(path, ttl_s=30)
    assert first._take_over(etag) and not second._take_over(etag)  # one winner of the same expired lease
    assert not paused._conditional_put(IfMatch=paused.etag)  # its renewal finds the lease gone
    assert json.loads(path.read_text())["token"] == first.token


def test_storage_options_name_the_endpoint_and_credentials(s3_endpoint, monkeypatch):
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    path = as_path("s3://moegrok/options/t.txt", options)
    path.write_text("via options")
    assert path.read_text() == "via options" and as_path("file:///tmp/x") == Path("/tmp/x")
    with pytest.raises(ConfigError, match=r"storage.options: \['endpoint'\] are not S3 options"):
        as_path("s3://moegrok/options/t.txt", {"endpoint": s3_endpoint}).exists()
