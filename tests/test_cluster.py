"""Sweeps as users run them on a cluster: submitted through the Ray Jobs API to a real head
started with `ray start`, the run directory synced to an fsspec URL, the cluster launcher and
KubeRay manifests checked against what Ray and KubeRay accept."""

import json
import shlex
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from moegrok.pipeline.run import sync
from moegrok.store import RunDir, write_parquet, write_text
from tests.ray_head import ray_head

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("metrics.parquet", "memorized.parquet", "accuracy.parquet", "correlations.parquet", "onsets.parquet")


def sweep_overrides(zoo: Path, run_dir: Path, *, evaluate: bool = True) -> list[str]:
    """jobs/monitor.py overrides for a small sweep of the tiny zoo."""
    overrides = [f"run_dir={run_dir}", f"checkpoints.dir={zoo}", f"samples.paths=[{zoo / 'samples.jsonl'}]",
                 "samples.max_per_group=20", "samples.shard_size=16", "samples.max_tokens=32",
                 "model.residue_tokens=11", "model.attn_implementation=eager", "progress=false",
                 "record.max_retries=0"]
    if evaluate:
        return [*overrides, f"eval.benchmarks=[{{name: heldout, path: {zoo / 'benchmark.jsonl'}}}]", "eval.engine=hf",
                "eval.max_items=40", "eval.max_new_tokens=2", "eval.max_retries=0"]
    return [*overrides, "eval=none"]


@pytest.fixture(scope="module")
def head():
    """A Ray head with the dashboard: 2 CPUs, its own ports and temp dir."""
    with ray_head(num_cpus=2) as head:
        yield head


def job_failure(head, job_id: str, status: str) -> str:
    return f"job {job_id} ended {status}:\n{head.client().get_job_logs(job_id)[-4000:]}"


@pytest.mark.slow
def test_sweep_submitted_as_a_ray_job(tiny_zoo, tmp_path, head):
    """`ray job submit --working-dir . -- python jobs/monitor.py cluster=ray_cluster ...`: the
    driver joins the head from inside the job, the tables and the report land in the run dir,
    and the run dir is synced to a file:// URL."""
    run_dir, copy = tmp_path / "run", tmp_path / "synced" / "run"
    command = [sys.executable, "jobs/monitor.py", "cluster=ray_cluster", *sweep_overrides(tiny_zoo, run_dir),
               f"cluster.sync_uri={copy.as_uri()}"]
    job_id = head.client().submit_job(entrypoint=shlex.join(command), runtime_env={"working_dir": str(ROOT)})
    status = head.wait(job_id, timeout_s=900)
    assert status == "SUCCEEDED", job_failure(head, job_id, status)

    run = RunDir(run_dir)
    metrics, accuracy = pd.read_parquet(run.metrics), pd.read_parquet(run.accuracy)
    assert set(metrics["checkpoint"]) == {"step0", "step3", "step6"} and metrics["pathway_distance"].notna().any()
    assert len(accuracy) == 6 and accuracy["n"].sum() == 3 * 40
    assert "<h2>Curves per group</h2>" in run.report.read_text()
    # the driver joined the head's cluster (not a Ray of its own): its actors ran there
    from ray.util.state import list_actors

    actors = list_actors(address=head.dashboard_url, limit=1000, raise_on_missing_output=False)
    assert {"RecordWorker", "EvalWorker"} <= {actor.class_name for actor in actors}
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(copy / name), pd.read_parquet(run_dir / name))
    assert (copy / "report.html").read_bytes() == run.report.read_bytes()
    # the working dir that went up holds the code and not the repo's bulk
    uploaded = next(head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*/"))
    assert (uploaded / "jobs" / "monitor.py").exists() and (uploaded / "moegrok" / "pipeline" / "run.py").exists()
    assert not {".git", ".venv", "zoo", "runs", "multirun"} & {p.name for p in uploaded.iterdir()}


def test_sync_copies_the_run_directory_to_an_fsspec_url(tmp_path):
    """Every table, nested directory and completion marker arrives; a second sync after a
    re-run overwrites in place (no nested copy)."""
    run = RunDir(tmp_path / "run")
    frame = pd.DataFrame({"checkpoint": ["step0", "step3"], "step": [0, 3], "pathway_distance": [1.5, 0.5]})
    write_parquet(frame, run.metrics)
    write_parquet(frame.head(1), run.sample_metrics / "shard00000.parquet")
    write_text("fingerprint", run.root / "routing" / "step0" / ".shard00000.parquet.done")
    url = (tmp_path / "bucket" / "prefix").as_uri()
    sync(run, url)
    write_parquet(frame.assign(pathway_distance=[2.0, 1.0]), run.metrics)  # a re-run changes a table
    sync(run, url)
    copy = tmp_path / "bucket" / "prefix"
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == sorted(p.relative_to(run.root)
                                                                         for p in run.root.rglob("*"))
    pd.testing.assert_frame_equal(pd.read_parquet(copy / "metrics.parquet"), pd.read_parquet(run.metrics))
    pd.testing.assert_frame_equal(pd.read_parquet(copy / "sample_metrics"), frame.head(1))


def test_working_dir_upload_leaves_out_the_bulk(tmp_path):
    """What `--working-dir .` packs, by Ray's own packaging, under the repo's .gitignore and
    .rayignore: the code, not the venv, zoo, runs or git history."""
    from ray._private.runtime_env.packaging import create_package

    for name in (".gitignore", ".rayignore"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    for path in ("jobs/monitor.py", "moegrok/config.py", "conf/monitor.yaml", "data/samples.jsonl", ".venv/bin/python",
                 "zoo/default/step0/model.safetensors", "runs/toy/metrics.parquet", ".git/objects/pack/x.pack",
                 "multirun/2026-01-01/0/x", ".cache/moegrok/checkpoints/x"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    package = tmp_path.parent / f"{tmp_path.name}.zip"
    create_package(str(tmp_path), package, include_gitignore=True)
    with zipfile.ZipFile(package) as archive:
        files = {name for name in archive.namelist() if not name.endswith("/")}
    assert files == {".gitignore", ".rayignore", "jobs/monitor.py", "moegrok/config.py", "conf/monitor.yaml",
                     "data/samples.jsonl"}


# --------------------------------------------------------------------------- where Ray runs


def test_a_job_driver_joins_the_jobs_cluster(monkeypatch):
    """cluster.address unset starts a Ray of our own, except in a driver that `ray job submit`
    started: there it joins the job's cluster. Sizing a cluster that is joined is an error."""
    from moegrok.config import RAY_JOB_ENV, ClusterConfig, ConfigError, ray_address
    from moegrok.pipeline.cluster import init_ray

    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    assert (ray_address(None), ray_address("auto"), ray_address("ray://head:10001")) == (
        "local", "auto", "ray://head:10001")
    monkeypatch.setenv(RAY_JOB_ENV, json.dumps({"runtime_env": {}}))
    assert ray_address(None) == "auto" and ray_address("10.0.0.1:6379") == "10.0.0.1:6379"
    with pytest.raises(ConfigError, match=r"cluster.num_cpus=2: sizes only a local Ray.*'auto'"):
        init_ray(ClusterConfig(num_cpus=2))
    monkeypatch.delenv(RAY_JOB_ENV)
    with pytest.raises(ConfigError, match=r"cluster.num_gpus=1"):
        init_ray(ClusterConfig(address="10.0.0.1:6379", num_gpus=1))
