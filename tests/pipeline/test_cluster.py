"""Sweeps as users run them on a cluster: submitted through the Ray Jobs API to a real head
started with `ray start`, the run directory synced to an fsspec URL, the cluster launcher and
KubeRay manifests checked against what Ray and KubeRay accept."""

import json
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moegrok.config import compose_config
from moegrok.pipeline.sweep import sync
from moegrok.store import RunDir, write_parquet, write_text
from tests.pipeline.ray_head import ray_head
from tests.reference.toy import tiny_sweep_overrides

ROOT = Path(__file__).resolve().parents[2]
TABLES = ("metrics.parquet", "memorized.parquet", "accuracy.parquet", "correlations.parquet", "onsets.parquet")


@pytest.fixture(scope="module")
def head():
    """A Ray head with the dashboard: 2 CPUs, its own ports and temp dir."""
    with ray_head(num_cpus=2) as head:
        yield head


def job_failure(head, job_id: str, status: str) -> str:
    return f"job {job_id} ended {status}:\n{head.client().get_job_logs(job_id)[-4000:]}"


@pytest.fixture(scope="module")
def grid(tiny_zoo, tmp_path_factory, head):
    """`ray job submit --working-dir . -- python jobs/sweep.py --multirun hydra/launcher=ray_grid ...`:
    a 3-point weight-share grid as one Ray job, each point's run dir synced to a file:// URL; the
    driver keeps the default cluster config and joins the job's cluster. The point 1.5 is a bad
    value: the job fails naming it after the whole grid ran. Returns the two good points' run dirs."""
    out = tmp_path_factory.mktemp("grid")
    overrides = [*tiny_sweep_overrides(tiny_zoo, out / "unused"), "metrics.weight_share=0.5,0.7,1.5",
                 f"run_dir={out}/thr${{metrics.weight_share}}", f"hydra.sweep.dir={out}/multirun",
                 f"cluster.sync_uri={(out / 'synced').as_uri()}/thr${{metrics.weight_share}}"]
    command = [sys.executable, "jobs/sweep.py", "--multirun", "hydra/launcher=ray_grid", *overrides]
    job_id = head.client().submit_job(entrypoint=shlex.join(command), runtime_env={"working_dir": str(ROOT)})
    status = head.wait(job_id, timeout_s=900)
    logs = head.client().get_job_logs(job_id)
    assert status == "FAILED", job_failure(head, job_id, status)
    assert f"GridPointFailed: {out}/thr1.5: exit status 2" in logs, logs[-4000:]
    return [out / "thr0.5", out / "thr0.7"]


def test_grid_points_run_at_once_as_ray_tasks(grid, head):
    """Both good grid points ran, each a complete sweep with its own weight share, at overlapping times
    (each from writing its config.yaml to writing its report.html)."""
    from ray.util.state import list_tasks

    intervals = []
    for run_dir, threshold in zip(grid, (0.5, 0.7), strict=True):
        run = RunDir(run_dir)
        assert yaml.safe_load(run.config.read_text())["metrics"]["weight_share"] == threshold
        metrics = pd.read_parquet(run.metrics)
        assert set(metrics["checkpoint"]) == {"step0", "step3", "step6"}
        assert len(pd.read_parquet(run.accuracy)) == 6 and run.report.exists()
        intervals.append((run.config.stat().st_mtime, run.report.stat().st_mtime))
    (start_a, end_a), (start_b, end_b) = intervals
    assert start_a < end_b and start_b < end_a, intervals
    pathways = [pd.read_parquet(RunDir(run_dir).metrics)["pathway_length"].mean() for run_dir in grid]
    assert pathways[0] < pathways[1]  # a higher weight share keeps more experts
    tasks = list_tasks(address=head.dashboard_url, filters=[("func_or_class_name", "=", "_run_job")],
                       raise_on_missing_output=False)
    assert len(tasks) >= 2


def test_a_grid_job_runs_on_the_jobs_cluster_and_syncs_each_run(grid, head):
    """The points' actors ran on the head's cluster (not a Ray of their own), each run dir arrived
    at its sync URL, and the working dir that went up holds the code, not the repo's bulk."""
    from ray.util.state import list_actors

    actors = list_actors(address=head.dashboard_url, limit=1000, raise_on_missing_output=False)
    assert {"RecordWorker", "EvalWorker"} <= {actor.class_name for actor in actors}
    for run_dir in grid:
        copy = run_dir.parent / "synced" / run_dir.name
        for name in TABLES:
            pd.testing.assert_frame_equal(pd.read_parquet(copy / name), pd.read_parquet(run_dir / name))
        assert (copy / "report.html").read_bytes() == (run_dir / "report.html").read_bytes()
    uploaded = next(head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*/"))
    assert (uploaded / "jobs" / "sweep.py").exists() and (uploaded / "moegrok" / "pipeline" / "sweep.py").exists()
    assert not {".git", ".venv", "zoo", "runs", "multirun"} & {p.name for p in uploaded.iterdir()}


def test_report_job_puts_the_grid_side_by_side(grid):
    """jobs/report.py on the grid's run dirs: each run's analysis and report (skipped where
    current), then one grid page and table in their common parent, labelled by the weight share."""
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "report.py"), *map(str, grid)], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    out = grid[0].parent
    assert f"grid report: {out / 'grid.html'}" in result.stdout
    table = pd.read_parquet(out / "grid.parquet")
    assert list(dict.fromkeys(table["run"])) == ["metrics.weight_share=0.5", "metrics.weight_share=0.7"]
    for run_dir, rows in table[table["metric"] == "pathway_length"].groupby("run_dir"):
        metrics = pd.read_parquet(RunDir(run_dir).metrics)
        last = metrics[(metrics["sample_set"] == "all") & (metrics["step"] == 6)].set_index("group")
        assert rows.set_index("group")["last"].to_dict() == last["pathway_length"].to_dict()
    page = (out / "grid.html").read_text()
    assert "<th>metrics.weight_share=0.5</th>" in page and "<th>metrics.weight_share=0.7</th>" in page


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
    Ray's default excludes: the code and data, not the venv, zoo, runs or git history."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    (tmp_path / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    for path in ("jobs/sweep.py", "moegrok/config.py", "conf/sweep.yaml", "data/samples.jsonl", ".venv/bin/python",
                 "zoo/default/step0/model.safetensors", "runs/toy/metrics.parquet", ".git/objects/pack/x.pack",
                 "multirun/2026-01-01/0/x", ".cache/moegrok/checkpoints/x", "moegrok/__pycache__/config.pyc"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    package = tmp_path.parent / f"{tmp_path.name}.zip"
    create_package(str(tmp_path), package, include_gitignore=True, excludes=get_runtime_env_default_excludes())
    with zipfile.ZipFile(package) as archive:
        files = {name for name in archive.namelist() if not name.endswith("/")}
    assert files == {".gitignore", "jobs/sweep.py", "moegrok/config.py", "conf/sweep.yaml", "data/samples.jsonl"}


# --------------------------------------------------------------------------- where Ray runs


def test_a_job_driver_joins_the_jobs_cluster(monkeypatch):
    """cluster.address unset starts a Ray of our own, except in a driver that `ray job submit`
    started: there it joins the job's cluster. Sizing a cluster that is joined is an error."""
    from moegrok.config import RAY_JOB_ENV, ClusterConfig, ray_address
    from moegrok.errors import ConfigError
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


# --------------------------------------------------------------------------- cluster.yaml


def load_yaml(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def autoscaler_schema() -> dict:
    """The JSON schema `ray up` validates a cluster config with, as installed with Ray."""
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_passes_the_autoscaler_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config, schema = load_yaml("cluster.yaml"), autoscaler_schema()
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs: provider defaults filled in, node types checked
    with pytest.raises(jsonschema.ValidationError, match="'setup_command' was unexpected"):
        jsonschema.validate({**config, "setup_command": []}, schema)  # a typo'd key does not pass


def image_versions(image: str) -> tuple[str, str]:
    """(Ray version, Python version) of a rayproject/ray image tag such as 2.60.0-py311-gpu."""
    repository, _, tag = image.partition(":")
    ray_version, python, *_ = tag.split("-")
    if repository != "rayproject/ray" or not python.startswith("py"):
        raise ValueError(f"image {image!r}: expected rayproject/ray:<ray version>-py<XY>[-gpu]")
    return ray_version, f"{python[2]}.{python[3:]}"


def test_cluster_images_run_the_pinned_ray_and_python():
    """The nodes run the Ray and Python that pyproject.toml pins (the laptop's `ray up` and
    `ray job submit` must match the cluster's Ray), in cluster.yaml and in the RayJob's image."""
    import tomllib

    import ray
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    image = load_yaml("cluster.yaml")["docker"]["image"]
    ray_version, python = image_versions(image)
    assert ray_version == ray.__version__
    assert python in SpecifierSet(project["requires-python"])
    base = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("FROM ")]
    assert base == [image]
    assert load_yaml("rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


def sweep_overrides(command: str) -> list[str]:
    """The overrides of the `python jobs/sweep.py ...` part of a shell command."""
    for part in command.split("&&"):
        words = shlex.split(part)
        if words[:2] == ["python", "jobs/sweep.py"]:
            return words[2:]
    raise ValueError(f"no `python jobs/sweep.py` in {command!r}")


def test_cluster_yaml_mounts_the_run_directory_of_the_experiment():
    config = load_yaml("cluster.yaml")
    cfg = compose_config("sweep", ["experiment=olmoe_1b_7b"])
    assert cfg.cluster.address == "auto" and cfg.cluster.num_cpus is None
    shared = "/mnt/shared"
    assert cfg.run_dir.startswith(shared + "/")
    assert f"-v {shared}:{shared}" in config["docker"]["run_options"]
    assert any(f"{shared})" in command for command in config["initialization_commands"])  # mounted on the host
    assert any("~/moegrok" in config["file_mounts"] and "$HOME/moegrok[gpu]" in command
               for command in config["setup_commands"])


# --------------------------------------------------------------------------- KubeRay RayJob

# What KubeRay's RayJob CRD (ray.io/v1, KubeRay v1.0 to v1.7) and its validation require:
# spec.entrypoint (required up to v1.1); rayClusterSpec.headGroupSpec with template and (up to
# v1.4) rayStartParams; each workerGroupSpec with groupName, minReplicas, maxReplicas, template
# and (up to v1.4) rayStartParams, 0 <= minReplicas <= replicas <= maxReplicas; rayStartParams
# values are strings; every pod template has containers, each with a name (and, for Kubernetes
# to run it, an image); a volume has a name, a persistentVolumeClaim a claimName; a RayJob name is
# a DNS-1035 label of at most 47 characters.


def pod_specs(spec: dict) -> dict[str, dict]:
    cluster = spec["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"],
            **{group["groupName"]: group["template"]["spec"] for group in cluster["workerGroupSpecs"]}}


def check_pod(name: str, pod: dict) -> None:
    if not pod.get("containers"):
        raise ValueError(f"{name}: template.spec.containers is empty")
    volumes = {}
    for volume in pod.get("volumes", []):
        if "name" not in volume:
            raise ValueError(f"{name}: volume {volume} has no name")
        if "persistentVolumeClaim" in volume and "claimName" not in volume["persistentVolumeClaim"]:
            raise ValueError(f"{name}: volume {volume['name']!r} has no persistentVolumeClaim.claimName")
        volumes[volume["name"]] = volume
    for container in pod["containers"]:
        if not container.get("name") or not container.get("image"):
            raise ValueError(f"{name}: container {container} needs a name and an image")
        resources = container.get("resources", {})
        if not resources.get("requests") or not resources.get("limits"):
            raise ValueError(f"{name}: container {container['name']!r} sets no resource requests and limits")
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                raise ValueError(f"{name}: volumeMount {mount['name']!r} names no volume of the pod")


def check_rayjob(job: dict) -> None:
    """KubeRay's required fields and validation rules (listed above); ValueError names the field."""
    import re

    if (job.get("apiVersion"), job.get("kind")) != ("ray.io/v1", "RayJob"):
        raise ValueError(f"apiVersion/kind {job.get('apiVersion')}/{job.get('kind')}: expected ray.io/v1 RayJob")
    name = job.get("metadata", {}).get("name", "")
    if len(name) > 47 or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        raise ValueError(f"metadata.name {name!r}: expected a DNS-1035 label of at most 47 characters")
    spec = job["spec"]
    if not spec.get("entrypoint"):
        raise ValueError("spec.entrypoint is missing")
    head = spec["rayClusterSpec"]["headGroupSpec"]
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    for group_name, group in [("head", head), *((g.get("groupName", "?"), g) for g in groups)]:
        for key in ("template", "rayStartParams") + (() if group is head else ("groupName", "minReplicas",
                                                                                "maxReplicas")):
            if key not in group:
                raise ValueError(f"{group_name}: {key} is missing")
        params = group["rayStartParams"]
        if not all(isinstance(value, str) for value in params.values()):
            raise ValueError(f"{group_name}: rayStartParams values must be strings: {params}")
        if group is not head and not 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]:
            raise ValueError(f"{group_name}: expected 0 <= minReplicas <= replicas <= maxReplicas")
    for pod_name, pod in pod_specs(spec).items():
        check_pod(pod_name, pod)


def test_rayjob_manifest_has_what_kuberay_requires():
    job = load_yaml("rayjob.yaml")
    check_rayjob(job)
    spec = job["spec"]
    gpus = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"]
            if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpus and spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # the entrypoint is a moegrok sweep whose run dir is on the volume every pod mounts
    cfg = compose_config("sweep", sweep_overrides(spec["entrypoint"]))
    assert "experiment=olmoe_1b_7b" in spec["entrypoint"] and cfg.cluster.address == "auto"
    for pod_name, pod in pod_specs(spec).items():
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert any(cfg.run_dir.startswith(path + "/") and name in claims for path, name in mounts.items()), pod_name
        assert any(cfg.checkpoints.cache_dir.startswith(path + "/") for path in mounts), pod_name


@pytest.mark.parametrize(("path", "value", "message"), [
    (("spec", "entrypoint"), None, "spec.entrypoint"),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "groupName"), None, "groupName is missing"),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplicas"), 4, "minReplicas <= replicas <= maxReplicas"),
    (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"), 0, "must be strings"),
    (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "volumes", 0, "persistentVolumeClaim"), {},
     "claimName"),
    (("metadata", "name"), "Moegrok_OLMoE", "DNS-1035"),
])
def test_rayjob_check_rejects_what_kuberay_rejects(path, value, message):
    job = load_yaml("rayjob.yaml")
    node = job
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises((ValueError, KeyError), match=message):
        check_rayjob(job)
