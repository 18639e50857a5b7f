"""The sweep as a whole (moegrok/pipeline/run.py): incremental re-runs, content-aware resume,
inputs checked before any work, bad records as failure rows, tables published as a set."""

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from moegrok.errors import UserError
from moegrok.pipeline import run_monitor
from moegrok.pipeline.cluster import check_reachable
from moegrok.routing_analyses import token_arrays
from moegrok.store import RunDir, read_tags, write_parquet
from tests.helpers import monitor_config
from tests.test_routing_analyses import ref_saturation

STAGES = ["record", "reduce", "evaluate", "analyze", "report"]


def summary(out: str) -> pd.DataFrame:
    """The sweep summary table a run printed."""
    lines = out.split("moegrok sweep summary")[1].splitlines()[1:]
    rows = [line.split() for line in lines[1:] if line.split() and line.split()[0] in STAGES]
    return pd.DataFrame(rows, columns=lines[0].split()).set_index("stage").drop(columns="seconds").astype(int)


def stamps(run: RunDir) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in run.root.rglob("*") if p.is_file() and p.parent != run.root}


@pytest.fixture
def zoo(tiny_zoo, tmp_path):
    """A private copy of the tiny zoo (tests change it)."""
    return Path(shutil.copytree(tiny_zoo, tmp_path / "zoo"))


def test_a_rerun_with_nothing_new_computes_nothing(zoo, tmp_path, ray_cluster, capsys):
    cfg = monitor_config(zoo, tmp_path / "run")
    assert run_monitor(cfg) == 0
    first = summary(capsys.readouterr().out)
    assert (first["done"] == first["units"]).all() and (first["skipped"] == 0).all()
    run = RunDir(cfg.run_dir)
    # workers wrote their outputs; the driver received receipts only, a small part of what they wrote
    stages = pd.read_parquet(run.stages).set_index("stage")
    written = {"record": run.root / "routing", "reduce": run.root / "parts", "evaluate": run.root / "eval"}
    for stage, directory in written.items():
        on_disk = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
        assert 0 < stages.loc[stage, "bytes_received"] < 0.1 * on_disk, stage
        assert stages.loc[stage, "bytes_received"] / stages.loc[stage, "done"] < 2_000, stage  # per unit
    before = stamps(run)
    assert run_monitor(cfg) == 0
    again = summary(capsys.readouterr().out)
    assert (again["skipped"] == again["units"]).all() and (again["done"] == 0).all(), again
    assert stamps(run) == before  # no unit output, part or figure was rewritten


def test_changed_settings_recompute_exactly_what_depends_on_them(zoo, tmp_path, ray_cluster, capsys):
    cfg = monitor_config(zoo, tmp_path / "run", checkpoints__max_step=3)
    assert run_monitor(cfg) == 0
    capsys.readouterr()
    cfg.metrics.threshold = 0.5
    assert run_monitor(cfg) == 0
    out = capsys.readouterr().out
    assert "reduce features: recomputing 6 of 6 units: metrics.threshold changed (6)" in out  # 2 x 3 shards
    table = summary(out)
    assert table.loc["record", "done"] == 0 and table.loc["evaluate", "done"] == 0
    assert table.loc["reduce", "done"] > 0

    benchmark = zoo / "benchmark.jsonl"  # an edited benchmark file re-scores every checkpoint, nothing else
    benchmark.write_text("".join(benchmark.read_text().splitlines(keepends=True)[:-1]))
    assert run_monitor(cfg) == 0
    out = capsys.readouterr().out
    assert "evaluate: recomputing 2 of 2 units: benchmark changed (2)" in out
    table = summary(out)
    assert table.loc["record", "done"] == table.loc["reduce", "done"] == 0 and table.loc["evaluate", "done"] == 2

    cfg.checkpoints.max_step = None  # one more checkpoint: its units, and what needs the last checkpoint
    assert run_monitor(cfg) == 0
    table = summary(capsys.readouterr().out)
    assert table.loc["record", "done"] == 3 and table.loc["evaluate", "done"] == 1  # its 3 shards, 1 benchmark
    assert set(pd.read_parquet(RunDir(cfg.run_dir).metrics)["checkpoint"]) == {"step0", "step3", "step6"}


def test_replaced_weights_rerun_that_checkpoint(zoo, tmp_path, ray_cluster, capsys):
    cfg = monitor_config(zoo, tmp_path / "run")
    assert run_monitor(cfg) == 0
    capsys.readouterr()
    run = RunDir(cfg.run_dir)
    accuracy = pd.read_parquet(run.accuracy).set_index(["checkpoint", "group"])["accuracy"]
    shutil.copy(zoo / "step6" / "model.safetensors", zoo / "step3" / "model.safetensors")  # same name, new content
    assert run_monitor(cfg) == 0
    out = capsys.readouterr().out
    assert "record: recomputing 3 of 9 units: checkpoint content changed (3)" in out
    assert "evaluate: recomputing 1 of 3 units: checkpoint content changed (1)" in out
    after = pd.read_parquet(run.accuracy).set_index(["checkpoint", "group"])["accuracy"]
    pd.testing.assert_series_equal(after.loc["step3"], accuracy.loc["step6"])  # step3 now holds step6's weights
    routing = {name: pd.concat(map(pd.read_parquet, sorted((run.root / "routing" / name).glob("*.parquet"))))
               .sort_values("sample_id", ignore_index=True) for name in ("step3", "step6")}
    assert routing["step3"]["topk_ids"].equals(routing["step6"]["topk_ids"])


def test_inputs_are_checked_before_any_work(zoo, tmp_path):
    cfg = monitor_config(zoo, tmp_path / "run")
    cfg.samples.paths = [str(tmp_path / "missing.jsonl")]
    with pytest.raises(UserError, match=r"samples.paths\[0\]=.*missing.jsonl': no such file"):
        run_monitor(cfg)
    (tmp_path / "empty.jsonl").write_text("")
    cfg.samples.paths = [str(tmp_path / "empty.jsonl")]
    with pytest.raises(UserError, match=r"samples.paths\[0\]=.*empty.jsonl': the file is empty"):
        run_monitor(cfg)
    cfg = monitor_config(zoo, tmp_path / "run")
    cfg.eval.benchmarks[0].path = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(UserError, match=r"eval.benchmarks\[heldout\].path=.*nowhere.jsonl': no such file"):
        run_monitor(cfg)
    assert not (tmp_path / "run").exists()  # no run dir, no config.yaml: nothing started


def test_samples_whose_lines_are_all_bad_are_a_user_error(zoo, tmp_path, ray_cluster):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": 1}\n\xff\xfe\n')
    cfg = monitor_config(zoo, tmp_path / "run")
    cfg.samples.paths = [str(bad)]
    with pytest.raises(UserError, match=r"no valid sample \(2 rejected; first: .*bad.jsonl:1: missing or empty"):
        run_monitor(cfg)


def test_bad_records_are_failure_rows_and_the_rest_goes_on(zoo, tmp_path, ray_cluster):
    samples = tmp_path / "samples.jsonl"
    lines = (zoo / "samples.jsonl").read_bytes().splitlines(keepends=True)
    not_utf8 = b'{"id": "x", "group": "add", "text": "\xff"}\n'
    empty = json.dumps({"id": "empty", "group": "blank", "prompt": "", "completion": ""}).encode() + b"\n"
    samples.write_bytes(b"".join([lines[0], not_utf8, empty, *lines[1:]]))
    benchmark = tmp_path / "benchmark.jsonl"
    items = (zoo / "benchmark.jsonl").read_text().splitlines(keepends=True)
    no_answer = json.dumps({"id": "q", "group": "add", "kind": "exact", "prompt": "1 + 1 ="}) + "\n"
    benchmark.write_text("".join([items[0], no_answer, *items[1:]]))
    cfg = monitor_config(zoo, tmp_path / "run")
    cfg.samples.paths, cfg.eval.benchmarks[0].path = [str(samples)], str(benchmark)
    assert run_monitor(cfg) == 1
    run = RunDir(cfg.run_dir)
    failures = pd.read_parquet(run.failures).set_index("unit")
    position = not_utf8.index(0xFF) + 1
    assert failures.loc[f"{samples}:2", "message"].endswith(f"invalid UTF-8 at byte {position} of the line")
    assert "has fewer than 2 tokens" in failures.loc[f"{samples}:3", "message"]
    assert failures.loc[f"{benchmark}:2", "message"].endswith("an exact item needs 'answer'")
    assert len(failures) == 3  # and nothing else failed
    assert pd.read_parquet(run.metrics).query("sample_set == 'all'")["num_samples"].max() == 20
    assert pd.read_parquet(run.accuracy)["n"].sum() == 3 * 40


def test_tables_of_two_reduces_are_never_mixed(zoo, tmp_path, ray_cluster):
    cfg = monitor_config(zoo, tmp_path / "run", eval__enabled=False)
    assert run_monitor(cfg) == 0
    run = RunDir(cfg.run_dir)
    tag = read_tags(run.metrics)["reduce"]
    assert all(read_tags(path)["reduce"] == tag for path in (run.memorized, run.routing_analyses))
    assert "run_dir: " + str(run.root) in read_tags(run.metrics)["config"]
    # a reduce killed while publishing: metrics.parquet from another reduce than memorized.parquet
    write_parquet(pd.read_parquet(run.metrics), run.metrics, tags={"reduce": "another"})
    write_parquet(pd.DataFrame({"checkpoint": ["step0"], "accuracy": [0.5]}), run.accuracy)
    cfg.stage = "analyze"
    with pytest.raises(RuntimeError, match="come from different reduce runs"):
        run_monitor(cfg)
    cfg.stage = "reduce"  # re-running the reduce publishes one set again, computing nothing
    assert run_monitor(cfg) == 0
    assert read_tags(run.metrics)["reduce"] == read_tags(run.memorized)["reduce"] == tag


def test_joining_a_cluster_that_does_not_answer_fails_at_once():
    with pytest.raises(UserError, match=r"cluster.address='127.0.0.1:1': no Ray cluster answers at 127.0.0.1:1"):
        check_reachable("127.0.0.1:1", timeout_s=5)
    environment = os.environ.pop("RAY_ADDRESS", None)
    try:
        os.environ["RAY_ADDRESS"] = "127.0.0.1:2"
        with pytest.raises(UserError, match=r"cluster.address='auto': no Ray cluster answers at 127.0.0.1:2"):
            check_reachable("auto", timeout_s=5)
    finally:
        os.environ.pop("RAY_ADDRESS")
        if environment is not None:
            os.environ["RAY_ADDRESS"] = environment


def test_compact_storage_gives_the_token_level_metrics(zoo, tmp_path, ray_cluster):
    """(Its bytes are measured at OLMoE's shape in benchmarks/storage.py: on the toy's 5-9 token
    samples the per-sample weights are not smaller than the tokens.)"""
    runs = {}
    for storage in ("tokens", "compact"):
        cfg = monitor_config(zoo, tmp_path / storage, eval__enabled=False)
        cfg.record.storage, cfg.record.token_samples_per_group = storage, 4
        cfg.metrics.positions = ["all", "answer"]
        assert run_monitor(cfg) == 0
        runs[storage] = RunDir(cfg.run_dir)
    features = {name: pd.read_parquet(run.sample_metrics).sort_values(["step", "sample_id"], ignore_index=True)
                for name, run in runs.items()}
    for column in ("pathway", "pathway_answer", "pathway_length", "pathway_length_answer", "loss"):
        pd.testing.assert_series_equal(features["compact"][column], features["tokens"][column])
    for column in ("mean_cos", "mean_cos_answer"):  # g is stored in float32
        pd.testing.assert_series_equal(features["compact"][column], features["tokens"][column], rtol=1e-5)
    metrics = {name: pd.read_parquet(run.metrics) for name, run in runs.items()}
    for column in ("pathway_distance", "pathway_distance_answer", "pathway_distance_chars", "pathway_length"):
        pd.testing.assert_series_equal(metrics["compact"][column], metrics["tokens"][column])
    compact = pd.concat(map(pd.read_parquet, sorted((runs["compact"].root / "routing" / "step3").glob("*.parquet"))))
    kept = compact[compact["topk_ids"].notna()]
    assert kept.groupby("group").size().to_dict() == {"add": 4, "mul": 4}  # 4 samples of each group keep tokens
    analyses = pd.read_parquet(runs["compact"].routing_analyses)  # computed on the token subset
    assert analyses["saturation"].notna().all() and set(analyses["group"]) == {"*", "add", "mul"}


def test_saturation_against_the_previous_checkpoint_needs_no_later_one(zoo, tmp_path, ray_cluster):
    cfg = monitor_config(zoo, tmp_path / "run", eval__enabled=False)
    assert run_monitor(cfg) == 0
    run = RunDir(cfg.run_dir)
    layers = pd.read_parquet(run.routing_analyses).query("group == '*'").set_index(["checkpoint", "layer"])
    assert layers.loc["step0", "saturation_previous"].isna().all()  # nothing before the first checkpoint
    tables = {name: pd.concat(map(pd.read_parquet, sorted((run.root / "routing" / name).glob("*.parquet"))))
              for name in ("step3", "step6")}
    arrays = {name: token_arrays(pa.Table.from_pandas(table, preserve_index=False), num_layers=2, top_k=2)[2]
              for name, table in tables.items()}
    previous, _ = ref_saturation(arrays["step6"], arrays["step3"])  # the direct form, step6 against step3
    final, _ = ref_saturation(arrays["step3"], arrays["step6"])  # and step3 against the last checkpoint
    assert layers.loc["step6", "saturation_previous"].to_numpy() == pytest.approx(previous)
    assert layers.loc["step3", "saturation"].to_numpy() == pytest.approx(final)
    metrics = pd.read_parquet(run.metrics)
    assert {"router_saturation", "router_saturation_previous", "top1_previous"} <= set(metrics.columns)


def test_an_item_without_a_score_is_a_failure_row_and_the_others_count(tmp_path):
    from moegrok.checkpoints import CheckpointRef
    from moegrok.pipeline.evaluate import write_accuracy
    from moegrok.store import mark_done

    run = RunDir(tmp_path)
    items = pd.DataFrame({"id": ["a", "b", "c"], "group": "add", "kind": "code", "prediction": "",
                          "score": [1.0, float("nan"), 0.0], "score_norm": [1.0, float("nan"), 0.0],
                          "error": [None, "RuntimeError: the sandbox could not start", None], "metrics": "{}"})
    path = run.eval_items("step1", "humaneval")
    write_parquet(items, path)
    mark_done(path, {"checkpoint": "step1"})
    accuracy, failures = write_accuracy(run, [CheckpointRef("step1", 1, None, "x")], ["humaneval"])
    assert [(f["unit"], f["error_type"]) for f in failures] == [("step1/humaneval/b", "ItemError")]
    assert "the sandbox could not start" in failures[0]["message"]
    assert accuracy[["accuracy", "n", "num_errors"]].values.tolist() == [[0.5, 2, 1]]


def test_without_evaluation_the_analyze_stage_writes_the_contrast_alone(zoo, tmp_path, ray_cluster):
    """The contrast needs training samples only; each level is the metrics.parquet value."""
    cfg = monitor_config(zoo, tmp_path / "run", eval__enabled=False, analysis__control="mul")
    assert run_monitor(cfg) == 0
    run = RunDir(cfg.run_dir)
    assert run.contrast.exists() and not run.correlations.exists() and not run.onsets.exists()
    contrast = pd.read_parquet(run.contrast)
    assert set(contrast["mode"]) == {"control", "others", "self"}
    assert set(contrast.loc[contrast["mode"] == "control", "reference"]) == {"mul", "others"}
    metrics = pd.read_parquet(run.metrics).query("sample_set == 'all'")
    joined = contrast[contrast["mode"] == "others"].merge(metrics, on=["step", "group"])
    for metric in ("pathway_distance", "pathway_distance_norm", "pathway_length", "mean_cos", "loss_mean"):
        rows = joined[joined["metric"] == metric]
        assert len(rows) == 6 and rows["level"].to_numpy() == pytest.approx(rows[metric].to_numpy()), metric
    med = contrast[contrast["metric"] == "med"].merge(metrics[["step", "group", "med"]], on=["step", "group"])
    assert med["level"].to_numpy() == pytest.approx(med["med"].to_numpy())
