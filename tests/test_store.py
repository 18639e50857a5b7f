import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

from moegrok.store import (
    RunDir,
    atomic_path,
    done_fingerprint,
    done_marker,
    error_fields,
    failure_row,
    fingerprint,
    invalidate,
    is_done,
    mark_done,
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


def test_atomic_dir_replaces_an_existing_dir(tmp_path):
    target = tmp_path / "model"
    for content in ("old", "new"):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "weights").write_text(content)
    assert (target / "weights").read_text() == "new" and len(list(tmp_path.iterdir())) == 1
    assert oct(target.stat().st_mode & 0o777) == "0o755"


def test_markers_hold_the_fingerprint_and_are_hidden(tmp_path):
    output = tmp_path / "shard00000.parquet"
    print_a, print_b = fingerprint("ckpt", 1, {"x": 1}), fingerprint("ckpt", 1, {"x": 2})
    assert print_a == fingerprint("ckpt", 1, {"x": 1}) and print_a != print_b
    assert done_marker(output).name == ".shard00000.parquet.done"
    assert not is_done(output, print_a)
    write_parquet(pd.DataFrame({"a": [1]}), output)
    assert not is_done(output, print_a) and done_fingerprint(output) is None  # written but not marked
    mark_done(output, print_a)
    assert is_done(output, print_a) and not is_done(output, print_b) and done_fingerprint(output) == print_a
    assert pd.read_parquet(tmp_path).shape == (1, 1)  # the directory reads as a dataset: markers are skipped
    invalidate(output)
    assert not is_done(output, print_a) and output.exists()
    os.remove(output)
    mark_done(output, print_a)
    assert not is_done(output, print_a)  # a marker without its output is not done


def test_failures_replace_a_stage_latest_attempt(tmp_path):
    run = RunDir(tmp_path)
    try:
        raise ValueError("bad shard")
    except ValueError as e:
        fields = error_fields(e)
    assert fields["error_type"] == "ValueError" and "bad shard" in fields["message"]
    assert "test_failures_replace" in fields["message"]  # the traceback's last frames name where
    run.write_failures({"record"}, [failure_row("record", "step0/shard00000", **fields),
                                    failure_row("record", "step1/shard00000", **fields)])
    run.write_failures({"evaluate"}, [failure_row("evaluate", "step0/heldout", "OSError", "x" * 5000)])
    run.write_failures({"record"}, [failure_row("record", "step1/shard00000", **fields)])
    table = pd.read_parquet(run.failures)
    assert table[["stage", "unit"]].values.tolist() == [["evaluate", "step0/heldout"],
                                                         ["record", "step1/shard00000"]]
    assert table["message"].str.len().max() == 2000 and str(table["time"].dtype) == "datetime64[ns, UTC]"
