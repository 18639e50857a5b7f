import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from moegrok.metrics_table import checkpoint_features, group_rows
from moegrok.pipeline import run_monitor
from moegrok.store import RunDir
from tests.helpers import monitor_config

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("metrics.parquet", "memorized.parquet", "accuracy.parquet", "sample_metrics")


def read_table(path: Path) -> pd.DataFrame:
    """A table file, or a directory of Parquet files read as one table in a stable row order."""
    frame = pd.read_parquet(path)
    return frame.sort_values(["step", "sample_id"], ignore_index=True) if path.is_dir() else frame


def read_routing(run_dir: Path, pattern: str = "*") -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(Path(run_dir).glob(f"routing/{pattern}/*.parquet"))])


def test_toy_sweep_end_to_end(tiny_zoo, tmp_path, ray_cluster):
    cfg = monitor_config(tiny_zoo, tmp_path / "run")
    assert run_monitor(cfg) == 0
    run = RunDir(cfg.run_dir)
    for path in (run.config, run.catalog, run.samples, run.metrics, run.accuracy, run.correlations, run.onsets,
                 run.report, run.memorized, run.sample_metrics):
        assert path.exists(), path
    metrics = pd.read_parquet(run.metrics)
    assert set(metrics["checkpoint"]) == {"step0", "step3", "step6"}
    assert set(metrics["group"]) == {"add", "mul"} and set(metrics["sample_set"]) == {"all", "memorized"}
    assert not metrics.duplicated(["checkpoint", "group", "sample_set"]).any()
    everything = metrics[metrics["sample_set"] == "all"]
    assert (everything["num_samples"] == 20).all() and everything["pathway_distance"].notna().all()
    assert everything["med"].notna().all()
    routing = read_routing(run.root, "step3")
    assert len(routing) == 40 and routing["sample_id"].is_unique
    accuracy = pd.read_parquet(run.accuracy)
    assert len(accuracy) == 6 and accuracy["n"].sum() == 3 * 40
    # the Ray Data reduce gives what the same functions give in one process
    memorized = pd.read_parquet(run.memorized)
    since = dict(zip(memorized["sample_id"], memorized["memorized_since"], strict=True))
    features = checkpoint_features(pq.read_table(sorted((run.root / "routing" / "step3").glob("*.parquet"))),
                                   load_file(run.checkpoint_weights("step3"))["routers"],
                                   threshold=cfg.metrics.threshold, positions=list(cfg.metrics.positions))
    for group, members in features.groupby("group"):
        expected = group_rows(members, memorized=since, positions=list(cfg.metrics.positions),
                              max_pairs=cfg.metrics.max_pairs, seed=cfg.metrics.seed)
        got = metrics[(metrics["checkpoint"] == "step3") & (metrics["group"] == group)]
        pd.testing.assert_frame_equal(got[expected.columns].reset_index(drop=True), expected, check_dtype=False)
    # a second run skips every recorded and evaluated unit and reproduces the tables
    before = {name: read_table(run.root / name) for name in TABLES}
    stamps = {p: p.stat().st_mtime_ns for p in (run.root / "routing").rglob("*.parquet")}
    assert run_monitor(cfg) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in (run.root / "routing").rglob("*.parquet")}
    for name, frame in before.items():
        pd.testing.assert_frame_equal(read_table(run.root / name), frame)


def test_changed_settings_recompute_instead_of_mixing(tiny_zoo, tmp_path, ray_cluster):
    cfg = monitor_config(tiny_zoo, tmp_path / "run", eval__enabled=False)
    assert run_monitor(cfg) == 0
    first = read_routing(cfg.run_dir, "step6")
    cfg.samples.max_tokens = 4  # truncates every sample: every unit's result changes
    assert run_monitor(cfg) == 0
    second = read_routing(cfg.run_dir, "step6")
    assert (second["num_tokens"] == 4).all() and (first["num_tokens"] > 4).all()
    assert len(second) == len(first)


def test_truncated_checkpoint_lands_in_failures(tiny_zoo, tmp_path, ray_cluster):
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    weights = zoo / "step3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    cfg = monitor_config(zoo, tmp_path / "run")
    assert run_monitor(cfg) == 1
    run = RunDir(cfg.run_dir)
    failures = pd.read_parquet(run.failures)
    assert set(failures["stage"]) == {"record", "evaluate"}
    assert failures["unit"].str.startswith("step3").all()
    assert failures["message"].str.contains("truncated safetensors").all()
    metrics = pd.read_parquet(run.metrics)
    assert set(metrics["checkpoint"]) == {"step0", "step6"}
    assert set(pd.read_parquet(run.accuracy)["checkpoint"]) == {"step0", "step6"}


def test_malformed_sample_line_is_recorded_and_skipped(tiny_zoo, tmp_path, ray_cluster):
    samples = tmp_path / "samples.jsonl"
    lines = (tiny_zoo / "samples.jsonl").read_text().splitlines()
    samples.write_text("\n".join([lines[0], '{"id": "bad", "group": "add"}', *lines[1:]]) + "\n")
    cfg = monitor_config(tiny_zoo, tmp_path / "run", eval__enabled=False)
    cfg.samples.paths = [str(samples)]
    assert run_monitor(cfg) == 1
    failures = pd.read_parquet(RunDir(cfg.run_dir).failures)
    assert failures["unit"].tolist() == [f"{samples}:2"]
    assert pd.read_parquet(RunDir(cfg.run_dir).metrics)["num_samples"].max() == 20


def _monitor_command(zoo: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable, str(ROOT / "jobs" / "monitor.py"), f"run_dir={run_dir}", f"checkpoints.dir={zoo}",
        f"samples.paths=[{zoo / 'samples.jsonl'}]", "samples.max_per_group=30", "samples.shard_size=4",
        "samples.max_tokens=32", "model.residue_tokens=11", "model.attn_implementation=eager", "eval=none",
        "cluster.num_cpus=2", "progress=false", "record.max_retries=0",
    ]


@pytest.mark.slow
def test_killed_sweep_resumes_to_identical_tables(tiny_zoo, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    whole = tmp_path / "whole"
    subprocess.run(_monitor_command(tiny_zoo, whole), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(_monitor_command(tiny_zoo, killed), env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(killed.glob("routing/*/.*.done"))) < 4:
        assert process.poll() is None and time.monotonic() < deadline, "sweep ended before it could be killed"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(list(killed.glob("routing/*/.*.done")))
    assert 4 <= done_before < 3 * 15  # 60 samples in 15 shards, 3 checkpoints
    subprocess.run(_monitor_command(tiny_zoo, killed), check=True, env=env, capture_output=True)
    for name in ("metrics.parquet", "memorized.parquet", "sample_metrics"):
        pd.testing.assert_frame_equal(read_table(killed / name), read_table(whole / name))
    routing = read_routing(killed)
    assert not routing.duplicated(["checkpoint", "sample_id"]).any() and len(routing) == 3 * 60


def test_tune_stage_evaluates_tuned_checkpoints_beside_direct_ones(tiny_zoo, tmp_path, ray_cluster):
    from moegrok.config import TuneConfig

    cfg = monitor_config(tiny_zoo, tmp_path / "run",
                         tune=TuneConfig(method="lora", rank=4, alpha=8, lr=1e-3, epochs=1, batch_size=8,
                                         max_examples=16, max_length=16, max_retries=0))
    assert run_monitor(cfg) == 0
    run = RunDir(cfg.run_dir)
    accuracy = pd.read_parquet(run.accuracy)
    assert accuracy["tuned"].sum() == accuracy["tuned"].size // 2 == 6
    assert set(accuracy.loc[accuracy["tuned"], "checkpoint"]) == {"step0+tuned", "step3+tuned", "step6+tuned"}
    correlations = pd.read_parquet(run.correlations)
    assert {"heldout", "heldout+tuned"} <= set(correlations["benchmark"])
    tuned_weights = run.root / "tuned" / "step3+tuned" / "model.safetensors"
    stamp = tuned_weights.stat().st_mtime_ns
    assert run_monitor(cfg) == 0  # resume: every tuned checkpoint is skipped
    assert tuned_weights.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_monitor_job_exits_non_zero_after_a_failed_unit(tiny_zoo, tmp_path):
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    (zoo / "step6" / "config.json").unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(_monitor_command(zoo, tmp_path / "run"), env=env, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "failed; see" in result.stdout
    assert pd.read_parquet(tmp_path / "run" / "failures.parquet")["unit"].str.startswith("step6").all()
