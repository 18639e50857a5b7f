import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moegrok.errors import UserError
from moegrok.store import (
    RunDir,
    atomic_path,
    changed_inputs,
    done_fingerprint,
    done_marker,
    error_fields,
    failure_row,
    fingerprint,
    invalidate,
    is_done,
    mark_done,
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
