"""The jobs as users run them (subprocesses): one-line errors, a driver killed mid-record (nothing
outlives it, a second sweep is refused while it runs, a re-run resumes to the uninterrupted tables),
a failed unit's exit status, a full disk."""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from moegrok.pipeline import run_sweep
from moegrok.store import RunDir
from tests.reference.jobs import ENV, kill_and_check_nothing_outlives, start, sweep_command
from tests.reference.toy import tiny_sweep_config

# 5 record units per checkpoint, so a kill lands in the middle of the record stage
SMALL_UNITS = ("samples.shard_size=8", "eval.enabled=false", "cluster.num_cpus=2")


def test_user_errors_are_one_line_and_exit_2(tiny_zoo, tmp_path):
    duplicated = tmp_path / "duplicated.jsonl"
    duplicated.write_text("".join(json.dumps({"id": "a", "group": "g", "text": "1 + 2 = 3"}) + "\n" for _ in "ab"))
    cases = {
        f"samples.paths=[{tmp_path / 'none.jsonl'}]": "samples.paths[0]=",
        f"samples.paths=[{duplicated}]": "duplicate sample id 'a'",
        "metrics.weight_share=1.5": "config key metrics.weight_share=1.5: expected a number in (0, 1)",
        "cluster.address=127.0.0.1:1 cluster.num_cpus=2": "config key cluster.num_cpus=2: sizes only a local Ray",
        "cluster.address=127.0.0.1:1": "cluster.address='127.0.0.1:1': 127.0.0.1:1 refused the connection",
        # what Hydra itself rejects, as one line too
        "metrics.weigth_share=0.5": "config key metrics.weigth_share: no such key; did you mean metrics.weight_share?",
        "record.max_retries=abc": "config key record.max_retries: Value 'abc' of type 'str' could not be converted",
        "model=olmoee": "config group model='olmoee': no such option (options: olmoe, toy)",
    }
    for override, message in cases.items():
        result = subprocess.run(sweep_command(tiny_zoo, tmp_path / "run", *override.split()), env=ENV,
                                capture_output=True, text=True)
        assert result.returncode == 2, (override, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("moegrok: ") and message in lines[0], (override, lines)


def markers(run: RunDir) -> int:
    return len(list(run.root.glob("routing/*/.*.done")))


@pytest.fixture
def broken_zoo(tiny_zoo, tmp_path) -> Path:
    """The tiny zoo with a truncated checkpoint, step3: its units fail, the others complete."""
    zoo = Path(shutil.copytree(tiny_zoo, tmp_path / "zoo"))
    weights = zoo / "step3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    return zoo


def test_a_killed_sweep_leaves_nothing_behind_and_resumes_to_the_same_tables(broken_zoo, tmp_path, ray_cluster):
    """Killed mid-record, then at the boundary from record to reduce; each time nothing outlives the
    driver, and the last run completes to the uninterrupted tables."""
    killed = RunDir(tmp_path / "killed")
    command = sweep_command(broken_zoo, killed.root, *SMALL_UNITS)
    process = start(command, lambda: markers(killed) >= 3)
    os.kill(process.pid, signal.SIGSTOP)  # frozen mid-record: it dispatches nothing more, and holds the run dir
    second = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert second.returncode == 2, second.stderr[-2000:]  # a second sweep on its run dir stops at once, naming it
    assert f"is in use by another sweep (pid {process.pid} on " in second.stderr
    assert 3 <= markers(killed) < 2 * 5  # 40 samples in 5 shards, 2 good checkpoints
    kill_and_check_nothing_outlives(process)
    kill_and_check_nothing_outlives(start(command, lambda: markers(killed) == 2 * 5))  # record done, reduce next

    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 1, resumed.stderr[-2000:]  # a failed unit: the rest completes, exit status 1
    assert "5 unit(s) failed, 0 bad record(s) left out" in resumed.stdout
    assert "  record: step3/shard00000: CheckpointError: checkpoint 'step3':" in resumed.stdout  # the first, in a line
    failures = pd.read_parquet(killed.failures)
    assert set(failures["stage"]) == {"record"} and failures["unit"].str.startswith("step3").all()
    assert failures["message"].str.contains("truncated safetensors").all()

    whole = tiny_sweep_config(broken_zoo, tmp_path / "whole", *SMALL_UNITS[:2])  # the same, uninterrupted
    assert run_sweep(whole, stages=["record", "reduce", "analyze"]) == 1
    for name in ("metrics.parquet", "memorized.parquet", "contrast.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(killed.root / name), pd.read_parquet(Path(whole.run_dir) / name))
    features = {run: pd.read_parquet(Path(run) / "sample_metrics").sort_values(["step", "sample_id"],
                                                                                ignore_index=True)
                for run in (killed.root, whole.run_dir)}
    pd.testing.assert_frame_equal(*features.values())
    assert set(features[killed.root]["checkpoint"]) == {"step0", "step6"}
    routing = pd.concat(map(pd.read_parquet, sorted(killed.root.glob("routing/*/*.parquet"))))
    assert not routing.duplicated(["checkpoint", "sample_id"]).any() and len(routing) == 2 * 40


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_full_disk_ends_the_sweep_in_one_line(tiny_zoo, tmp_path):
    """The run dir on a 300 KiB tmpfs, mounted in a mount namespace of our own (no root needed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    command = " ".join(f"'{part}'" for part in sweep_command(tiny_zoo, disk / "run", *SMALL_UNITS))
    script = f"mount -t tmpfs -o size=300k tmpfs '{disk}' && exec {command}"
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith("moegrok: ")]
    assert len(ours) == 1 and "Traceback" not in result.stderr
    assert f"run dir {disk / 'run'}: no space left on the device" in ours[0]


def test_code_benchmarks_stop_at_start_up_where_code_cannot_run_isolated(tiny_zoo, tmp_path):
    """No bubblewrap on the PATH: a sweep with a code benchmark stops before any work, saying how
    to install it; eval.sandbox=unisolated is the explicit way to run anyway."""
    code = tmp_path / "code.jsonl"
    code.write_text(json.dumps({"id": "c", "group": "add", "kind": "code", "prompt": "x =", "tests": "assert True"}))
    command = sweep_command(tiny_zoo, tmp_path / "run", f"eval.benchmarks=[{{name: code, path: {code}}}]")
    result = subprocess.run(command, env={**ENV, "PATH": str(tmp_path / "empty")}, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moegrok: eval.benchmarks[code] has code items, and generated code "
                                                   "cannot run isolated on this machine (bubblewrap (bwrap) is not "
                                                   "installed): install bubblewrap"), lines
    assert "eval.sandbox=unisolated" in lines[0] and not (tmp_path / "run").exists()
