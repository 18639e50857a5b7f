"""The sweep as a whole (moegrok/pipeline/sweep.py): the tables of a finished sweep, incremental
re-runs, content-aware resume, inputs checked before any work, bad records as failure rows, tables
published as a set. Tests that only read a finished sweep share the session's `swept_run`."""

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from moegrok.errors import UserError
from moegrok.metrics.table import checkpoint_features, group_rows
from moegrok.pipeline import run_sweep
from moegrok.pipeline.cluster import check_reachable
from moegrok.routing.analyses import token_arrays
from moegrok.store import RunDir, read_tags, write_parquet
from tests.reference.routing_analyses import ref_saturation
from tests.reference.toy import tiny_sweep_config

STAGES = ["record", "reduce", "tune", "evaluate", "analyze", "report"]
WORK = ["record", "reduce", "evaluate"]  # the stages whose units a test counts: analysis and report left out
TABLES = ("metrics.parquet", "memorized.parquet", "accuracy.parquet", "contrast.parquet", "sample_metrics")


def summary(out: str) -> pd.DataFrame:
    """The sweep summary table a run printed."""
    lines = out.split("moegrok sweep summary")[1].splitlines()[1:]
    rows = [line.split() for line in lines[1:] if line.split() and line.split()[0] in STAGES]
    return pd.DataFrame(rows, columns=lines[0].split()).set_index("stage").drop(columns="seconds").astype(int)


def stamps(run: RunDir) -> dict[Path, int]:
    return {p.relative_to(run.root): p.stat().st_mtime_ns for p in run.root.rglob("*")
            if p.is_file() and p.parent != run.root}


def read_table(path: Path) -> pd.DataFrame:
    """A table file, or a directory of Parquet files read as one table in a stable row order."""
    frame = pd.read_parquet(path)
    return frame.sort_values(["step", "sample_id"], ignore_index=True) if path.is_dir() else frame


def routing_of(run: RunDir, checkpoint: str) -> pd.DataFrame:
    return pd.concat(map(pd.read_parquet, sorted((run.root / "routing" / checkpoint).glob("*.parquet"))))


def rerun_config(run: RunDir, *overrides: str):
    """The config a run was swept with (its zoo and settings), pointed at `run`."""
    zoo = Path(pd.read_parquet(run.catalog)["uri"].iloc[0]).parent
    return tiny_sweep_config(zoo, run.root, "analysis.control=mul", *overrides)


@pytest.fixture
def zoo(tiny_zoo, tmp_path):
    """A private copy of the tiny zoo (tests change it)."""
    return Path(shutil.copytree(tiny_zoo, tmp_path / "zoo"))


def test_a_sweep_writes_every_table_from_the_workers(swept_run):
    run = swept_run
    for path in (run.config, run.catalog, run.samples, run.metrics, run.accuracy, run.correlations, run.onsets,
                 run.contrast, run.report, run.memorized, run.sample_metrics):
        assert path.exists(), path
    metrics = pd.read_parquet(run.metrics)
    assert set(metrics["checkpoint"]) == {"step0", "step3", "step6"}
    assert set(metrics["group"]) == {"add", "mul"} and set(metrics["sample_set"]) == {"all", "memorized"}
    assert not metrics.duplicated(["checkpoint", "group", "sample_set"]).any()
    everything = metrics[metrics["sample_set"] == "all"]
    assert (everything["num_samples"] == 20).all() and everything["pathway_distance"].notna().all()
    assert everything["med"].notna().all() and everything["pathway_distance_answer"].notna().all()
    routing = routing_of(run, "step3")
    assert len(routing) == 40 and routing["sample_id"].is_unique
    accuracy = pd.read_parquet(run.accuracy)
    assert len(accuracy) == 6 and accuracy["n"].sum() == 3 * 40
    # workers wrote their outputs; the driver received receipts only, a small part of what they wrote
    stages = pd.read_parquet(run.stages).set_index("stage")
    written = {"record": run.root / "routing", "reduce": run.root / "parts", "evaluate": run.root / "eval"}
    for stage, directory in written.items():
        on_disk = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
        assert 0 < stages.loc[stage, "bytes_received"] < 0.1 * on_disk, stage
        assert stages.loc[stage, "bytes_received"] / stages.loc[stage, "done"] < 2_000, stage  # per unit


def test_the_reduce_on_ray_gives_what_the_same_functions_give_in_one_process(swept_run):
    run, cfg = swept_run, rerun_config(swept_run)
    metrics = pd.read_parquet(run.metrics)
    memorized = pd.read_parquet(run.memorized)
    since = dict(zip(memorized["sample_id"], memorized["memorized_since"], strict=True))
    positions = [str(p) for p in cfg.metrics.positions]
    features = checkpoint_features(pq.read_table(sorted((run.root / "routing" / "step3").glob("*.parquet"))),
                                   load_file(run.checkpoint_weights("step3"))["routers"],
                                   weight_share=cfg.metrics.weight_share, positions=positions)
    for group, members in features.groupby("group"):
        expected = group_rows(members, memorized=since, positions=positions, max_pairs=cfg.metrics.max_pairs,
                              seed=cfg.metrics.seed)
        got = metrics[(metrics["checkpoint"] == "step3") & (metrics["group"] == group)]
        pd.testing.assert_frame_equal(got[expected.columns].reset_index(drop=True), expected, check_dtype=False)


def test_a_rerun_with_nothing_new_computes_nothing(swept_copy, capsys):
    before_tables = {name: read_table(swept_copy.root / name) for name in TABLES}
    before = stamps(swept_copy)
    assert run_sweep(rerun_config(swept_copy)) == 0
    again = summary(capsys.readouterr().out)
    assert (again["skipped"] == again["units"]).all() and (again["done"] == 0).all(), again
    assert stamps(swept_copy) == before  # no unit output, part or figure was rewritten
    for name, frame in before_tables.items():
        pd.testing.assert_frame_equal(read_table(swept_copy.root / name), frame)


def test_changed_inputs_recompute_exactly_what_depends_on_them(zoo, tmp_path, ray_cluster, capsys):
    cfg = tiny_sweep_config(zoo, tmp_path / "run", "checkpoints.max_step=3")
    run = RunDir(cfg.run_dir)
    assert run_sweep(cfg, stages=WORK) == 0
    capsys.readouterr()

    cfg.metrics.weight_share = 0.5  # a reduce setting: the reduce only
    assert run_sweep(cfg, stages=WORK) == 0
    out = capsys.readouterr().out
    assert "reduce features: recomputing 6 of 6 units: metrics.weight_share changed (6)" in out  # 2 x 3 shards
    table = summary(out)
    assert table.loc["record", "done"] == table.loc["evaluate", "done"] == 0 and table.loc["reduce", "done"] > 0

    benchmark = zoo / "benchmark.jsonl"  # an edited benchmark file re-scores every checkpoint, nothing else
    benchmark.write_text("".join(benchmark.read_text().splitlines(keepends=True)[:-1]))
    assert run_sweep(cfg, stages=WORK) == 0
    out = capsys.readouterr().out
    assert "evaluate: recomputing 2 of 2 units: benchmark changed (2)" in out
    table = summary(out)
    assert table.loc["record", "done"] == table.loc["reduce", "done"] == 0 and table.loc["evaluate", "done"] == 2

    cfg.checkpoints.max_step = None  # one more checkpoint: its units, and what needs the last checkpoint
    assert run_sweep(cfg, stages=WORK) == 0
    table = summary(capsys.readouterr().out)
    assert table.loc["record", "done"] == 3 and table.loc["evaluate", "done"] == 1  # its 3 shards, 1 benchmark
    assert set(pd.read_parquet(run.metrics)["checkpoint"]) == {"step0", "step3", "step6"}

    # checkpoint content counts, not its name: weights replaced in place re-run that checkpoint
    accuracy = pd.read_parquet(run.accuracy).set_index(["checkpoint", "group"])["accuracy"]
    shutil.copy(zoo / "step6" / "model.safetensors", zoo / "step3" / "model.safetensors")
    assert run_sweep(cfg, stages=WORK) == 0
    out = capsys.readouterr().out
    assert "record: recomputing 3 of 9 units: checkpoint content changed (3)" in out
    assert "evaluate: recomputing 1 of 3 units: checkpoint content changed (1)" in out
    after = pd.read_parquet(run.accuracy).set_index(["checkpoint", "group"])["accuracy"]
    pd.testing.assert_series_equal(after.loc["step3"], accuracy.loc["step6"])  # step3 now holds step6's weights
    routing = {name: routing_of(run, name).sort_values("sample_id", ignore_index=True) for name in ("step3", "step6")}
    assert routing["step3"]["topk_ids"].equals(routing["step6"]["topk_ids"])

    first = routing_of(run, "step6")
    cfg.samples.max_tokens = 4  # truncates every sample: every unit's result changes, none is mixed in
    assert run_sweep(cfg, stages=["record"]) == 0
    second = routing_of(run, "step6")
    assert (second["num_tokens"] == 4).all() and (first["num_tokens"] > 4).all() and len(second) == len(first)


def test_inputs_are_checked_before_any_work(zoo, tmp_path):
    cfg = tiny_sweep_config(zoo, tmp_path / "run")
    cfg.samples.paths = [str(tmp_path / "missing.jsonl")]
    with pytest.raises(UserError, match=r"samples.paths\[0\]=.*missing.jsonl': no such file"):
        run_sweep(cfg)
    (tmp_path / "empty.jsonl").write_text("")
    cfg.samples.paths = [str(tmp_path / "empty.jsonl")]
    with pytest.raises(UserError, match=r"samples.paths\[0\]=.*empty.jsonl': the file is empty"):
        run_sweep(cfg)
    cfg = tiny_sweep_config(zoo, tmp_path / "run")
    cfg.eval.benchmarks[0].path = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(UserError, match=r"eval.benchmarks\[heldout\].path=.*nowhere.jsonl': no such file"):
        run_sweep(cfg)
    assert not (tmp_path / "run").exists()  # no run dir, no config.yaml: nothing started


def test_samples_whose_lines_are_all_bad_are_a_user_error(zoo, tmp_path, ray_cluster):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": 1}\n\xff\xfe\n')
    cfg = tiny_sweep_config(zoo, tmp_path / "run")
    cfg.samples.paths = [str(bad)]
    with pytest.raises(UserError, match=r"no valid sample \(2 rejected; first: .*bad.jsonl:1: missing or empty"):
        run_sweep(cfg)


def test_bad_records_are_failure_rows_and_the_rest_goes_on(zoo, tmp_path, ray_cluster):
    samples = tmp_path / "samples.jsonl"
    lines = (zoo / "samples.jsonl").read_bytes().splitlines(keepends=True)
    by_group = {group: [line for line in lines if json.loads(line)["group"] == group] for group in ("add", "mul")}
    not_utf8 = b'{"id": "x", "group": "add", "text": "\xff"}\n'
    # in a group of 20 (samples.max_per_group): it is selected, and its group's metrics stay finite without it
    empty = json.dumps({"id": "empty", "group": "add", "prompt": "1 + 1 =", "completion": ""}).encode() + b"\n"
    no_text = b'{"id": "bad", "group": "add"}\n'
    samples.write_bytes(b"".join([by_group["add"][0], not_utf8, empty, no_text, *by_group["add"][1:19],
                                  *by_group["mul"][:20]]))
    benchmark = tmp_path / "benchmark.jsonl"
    items = (zoo / "benchmark.jsonl").read_text().splitlines(keepends=True)
    no_answer = json.dumps({"id": "q", "group": "add", "kind": "exact", "prompt": "1 + 1 ="}) + "\n"
    benchmark.write_text("".join([items[0], no_answer, *items[1:]]))
    cfg = tiny_sweep_config(zoo, tmp_path / "run", "checkpoints.max_step=3")
    cfg.samples.paths, cfg.eval.benchmarks[0].path = [str(samples)], str(benchmark)
    assert run_sweep(cfg, stages=WORK) == 1
    run = RunDir(cfg.run_dir)
    failures = pd.read_parquet(run.failures).set_index("unit")
    position = not_utf8.index(0xFF) + 1
    assert failures.loc[f"{samples}:2", "message"].endswith(f"invalid UTF-8 at byte {position} of the line")
    assert "has nothing to score: its completion is empty" in failures.loc[f"{samples}:3", "message"]
    assert "needs either a string 'text' or string 'prompt' and 'completion'" in failures.loc[f"{samples}:4",
                                                                                              "message"]
    assert failures.loc[f"{benchmark}:2", "message"].endswith("an exact item needs 'answer'")
    assert len(failures) == 4  # and nothing else failed
    everything = pd.read_parquet(run.metrics).query("sample_set == 'all'")
    assert everything["num_samples"].max() == 20
    # no metric of a group is NaN because one of its samples had nothing to score: every family
    families = ["pathway_distance", "pathway_distance_chars", "pathway_distance_norm", "pathway_length", "mean_cos",
                "consistency", "loss_mean", "train_accuracy", "med"]
    for column in [c for c in everything if c.removesuffix("_answer") in families]:
        assert everything[column].notna().all(), column
    assert pd.read_parquet(run.accuracy)["n"].sum() == 2 * 40


def test_tables_of_two_reduces_are_never_mixed(swept_copy):
    run = swept_copy
    tag = read_tags(run.metrics)["reduce"]
    assert all(read_tags(path)["reduce"] == tag for path in (run.memorized, run.routing_analyses))
    assert "run_dir: " in read_tags(run.metrics)["config"]
    # a reduce killed while publishing: metrics.parquet from another reduce than memorized.parquet
    write_parquet(pd.read_parquet(run.metrics), run.metrics, tags={"reduce": "another"})
    cfg = rerun_config(run, "stage=analyze")
    with pytest.raises(RuntimeError, match="come from different reduce runs"):
        run_sweep(cfg)
    cfg.stage = "reduce"  # re-running the reduce publishes one set again, computing nothing
    assert run_sweep(cfg) == 0
    assert read_tags(run.metrics)["reduce"] == read_tags(run.memorized)["reduce"] == tag


def test_joining_a_cluster_that_does_not_answer_fails_at_once():
    with pytest.raises(UserError, match=r"cluster.address='127.0.0.1:1': 127.0.0.1:1 refused the connection"):
        check_reachable("127.0.0.1:1", timeout_s=5)
    environment = os.environ.pop("RAY_ADDRESS", None)
    try:
        os.environ["RAY_ADDRESS"] = "127.0.0.1:2"
        with pytest.raises(UserError, match=r"cluster.address='auto': 127.0.0.1:2 refused the connection"):
            check_reachable("auto", timeout_s=5)
    finally:
        os.environ.pop("RAY_ADDRESS")
        if environment is not None:
            os.environ["RAY_ADDRESS"] = environment


def test_compact_storage_gives_the_token_level_metrics(swept_run, tmp_path):
    """Against the shared token-level sweep of the same samples. (Its bytes are measured at OLMoE's
    shape in benchmarks/storage.py: on the toy's 5-9 token samples the per-sample weights are not
    smaller than the tokens.)"""
    cfg = rerun_config(swept_run, "record.storage=compact", "record.token_samples_per_group=4", "eval.enabled=false")
    cfg.run_dir = str(tmp_path / "compact")
    assert run_sweep(cfg, stages=["record", "reduce"]) == 0
    runs = {"tokens": swept_run, "compact": RunDir(cfg.run_dir)}
    features = {name: pd.read_parquet(run.sample_metrics).sort_values(["step", "sample_id"], ignore_index=True)
                for name, run in runs.items()}
    for column in ("pathway", "pathway_answer", "pathway_length", "pathway_length_answer", "loss"):
        pd.testing.assert_series_equal(features["compact"][column], features["tokens"][column])
    for column in ("mean_cos", "mean_cos_answer"):  # g is stored in float32
        pd.testing.assert_series_equal(features["compact"][column], features["tokens"][column], rtol=1e-5)
    metrics = {name: pd.read_parquet(run.metrics) for name, run in runs.items()}
    for column in ("pathway_distance", "pathway_distance_answer", "pathway_distance_chars", "pathway_length"):
        pd.testing.assert_series_equal(metrics["compact"][column], metrics["tokens"][column])
    kept = routing_of(runs["compact"], "step3").dropna(subset=["topk_ids"])
    assert kept.groupby("group").size().to_dict() == {"add": 4, "mul": 4}  # 4 samples of each group keep tokens
    analyses = pd.read_parquet(runs["compact"].routing_analyses)  # computed on the token subset
    assert analyses["saturation"].notna().all() and set(analyses["group"]) == {"*", "add", "mul"}


def test_saturation_against_the_previous_checkpoint_needs_no_later_one(swept_run):
    run = swept_run
    layers = pd.read_parquet(run.routing_analyses).query("group == '*'").set_index(["checkpoint", "layer"])
    assert layers.loc["step0", "saturation_previous"].isna().all()  # nothing before the first checkpoint
    arrays = {name: token_arrays(pa.Table.from_pandas(routing_of(run, name), preserve_index=False), num_layers=2,
                                 top_k=2)[2] for name in ("step3", "step6")}
    previous, _ = ref_saturation(arrays["step6"], arrays["step3"])  # the direct form, step6 against step3
    final, _ = ref_saturation(arrays["step3"], arrays["step6"])  # and step3 against the last checkpoint
    assert layers.loc["step6", "saturation_previous"].to_numpy() == pytest.approx(previous)
    assert layers.loc["step3", "saturation"].to_numpy() == pytest.approx(final)
    metrics = pd.read_parquet(run.metrics)
    assert {"router_saturation", "router_saturation_previous", "top1_previous"} <= set(metrics.columns)



def test_saturation_units_cover_runs_of_checkpoints_with_the_same_numbers(swept_copy, monkeypatch):
    """A saturation unit reads the reference once for several checkpoints: chunked differently
    (one checkpoint per unit here), the table is the same."""
    from moegrok.pipeline import reduce_analyses
    before = pd.read_parquet(swept_copy.routing_analyses)
    monkeypatch.setattr(reduce_analyses, "SATURATION_CHUNK", 1)
    assert run_sweep(rerun_config(swept_copy, "stage=reduce")) == 0
    assert sorted(p.name for p in (swept_copy.root / "parts" / "saturation").glob("*+1.parquet")) == [
        "step0+1.parquet", "step3+1.parquet", "step6+1.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(swept_copy.routing_analyses), before)

def test_an_item_without_a_score_is_a_failure_row_and_the_others_count(tmp_path):
    from moegrok.data.checkpoints import CheckpointRef
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


def test_without_evaluation_the_analyze_stage_writes_the_contrast_alone(swept_copy):
    """The contrast needs training samples only; each level is the metrics.parquet value."""
    run = swept_copy
    for path in (run.accuracy, run.correlations, run.onsets, run.contrast):
        path.unlink()
    assert run_sweep(rerun_config(run, "eval.enabled=false", "stage=analyze")) == 0
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


def test_tune_stage_evaluates_tuned_checkpoints_beside_direct_ones(swept_copy):
    """Turning tuning on in a finished sweep tunes and scores the tuned checkpoints only."""
    cfg = rerun_config(swept_copy, "tune.enabled=true", "tune.rank=4", "tune.alpha=8", "tune.lr=1e-3",
                       "tune.epochs=1", "tune.max_examples=16", "tune.max_length=16", "tune.max_retries=0")
    assert run_sweep(cfg, stages=[*WORK, "tune", "analyze"]) == 0
    stages = pd.read_parquet(swept_copy.stages).set_index("stage")
    assert stages.loc["record", "done"] == stages.loc["reduce", "done"] == 0 and stages.loc["tune", "done"] == 3
    accuracy = pd.read_parquet(swept_copy.accuracy)
    assert accuracy["tuned"].sum() == accuracy["tuned"].size // 2 == 6
    assert set(accuracy.loc[accuracy["tuned"], "checkpoint"]) == {"step0+tuned", "step3+tuned", "step6+tuned"}
    correlations = pd.read_parquet(swept_copy.correlations)
    assert {"heldout", "heldout+tuned"} <= set(correlations["benchmark"])
    tuned_weights = swept_copy.root / "tuned" / "step3+tuned" / "model.safetensors"
    stamp = tuned_weights.stat().st_mtime_ns
    assert run_sweep(cfg, stages=["tune"]) == 0  # resume: every tuned checkpoint is skipped
    assert tuned_weights.stat().st_mtime_ns == stamp


def test_routing_tables_say_how_they_were_recorded_and_a_sweep_refuses_to_mix_them(swept_copy):
    from moegrok.data.checkpoints import CheckpointRef
    from moegrok.errors import ConfigError
    from moegrok.pipeline.record import check_record_settings

    run = swept_copy
    shards = sorted((run.root / "routing" / "step3").glob("*.parquet"))
    metadata = pq.read_schema(shards[0]).metadata
    assert {key: metadata[key.encode()].decode() for key in ("architecture", "experts_implementation", "compiled",
                                                             "dtype")} == {
        "architecture": "OlmoeForCausalLM", "experts_implementation": "grouped_mm", "compiled": "false",
        "dtype": "float32"}
    refs = [CheckpointRef(name=name, step=0, tokens=None, uri="") for name in pd.read_parquet(run.catalog)["name"]]
    check_record_settings(run, refs, len(shards))  # one sweep, one setting: fine
    table = pq.read_table(shards[0])
    write_parquet(table.replace_schema_metadata({**metadata, b"experts_implementation": b"fused_triton"}), shards[0])
    with pytest.raises(ConfigError, match=r"OlmoeForCausalLM routing tables of this sweep were recorded with different "
                                          r"settings: .*experts_implementation=grouped_mm.*"
                                          r"experts_implementation=fused_triton.*\(step3/shard00000\)"):
        check_record_settings(run, refs, len(shards))
