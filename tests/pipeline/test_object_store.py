"""A sweep whose run dir, checkpoint catalog, sample file and benchmark file are in an S3 bucket (a
real S3 server on loopback, `s3_endpoint`): killed with kill -9 mid-record, a second sweep refused
by the lease meanwhile, resumed from the bucket to the tables of the local run."""

import json
import os
import signal
import time

import pandas as pd
import pyarrow.fs as pafs
import pytest

from moegrok.errors import UserError
from moegrok.pipeline import run_sweep
from moegrok.store import RunDir, configure_storage, filesystem, read_parquet
from tests.reference.jobs import ENV, kill_and_check_nothing_outlives, start, sweep_command
from tests.reference.toy import tiny_sweep_config

TABLES = ("metrics", "memorized", "accuracy", "correlations", "onsets", "contrast")


@pytest.fixture(scope="module")
def bucket_zoo(tiny_zoo, s3_endpoint) -> str:
    """The tiny zoo (checkpoint folders, samples.jsonl, benchmark.jsonl) uploaded to the bucket."""
    pafs.copy_files(str(tiny_zoo), "moegrok/zoo", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=filesystem("s3", {}))
    return "s3://moegrok/zoo"


def record_markers(run: RunDir) -> int:
    return sum(info.base_name.endswith(".done") for info in (run.root / "routing").listing(recursive=True))


def test_a_sweep_into_the_bucket_resumes_after_kill_9_to_the_local_tables(bucket_zoo, s3_endpoint, swept_run,
                                                                         ray_cluster, tmp_path):
    run_url = "s3://moegrok/runs/killed"
    # the killed driver reaches the bucket through the AWS_* variables, as a user's shell would pass them
    cache = f"checkpoints.cache_dir={tmp_path / 'cache'}"  # the bucket's checkpoints are copied here
    command = sweep_command(bucket_zoo, run_url, "analysis.control=mul", "storage.lease_ttl_s=10",
                            "cluster.num_cpus=2", cache)
    env = {**ENV, **{key: os.environ[key] for key in os.environ if key.startswith("AWS_")}}
    run = RunDir(run_url)
    process = start(command, lambda: record_markers(run) >= 2, env=env)
    os.kill(process.pid, signal.SIGSTOP)  # frozen mid-record, its lease no longer renewed
    assert record_markers(run) < 9  # 3 checkpoints x 3 shards

    # the resumed sweep reaches it through storage.options instead
    options = [f"+storage.options.endpoint_url={s3_endpoint}", "+storage.options.key=testing",
               "+storage.options.secret=testing"]
    cfg = tiny_sweep_config(bucket_zoo, run_url, "analysis.control=mul", "storage.lease_ttl_s=10", cache, *options)
    with pytest.raises(UserError, match=rf"run dir {run_url} is in use by another sweep \(pid {process.pid} on "):
        run_sweep(cfg)
    kill_and_check_nothing_outlives(process)
    held = json.loads((run.root / ".lease").read_text())
    time.sleep(max(0.0, held["expires"] - time.time()) + 0.5)  # a killed holder's lease expires
    try:
        assert run_sweep(cfg) == 0
    finally:
        configure_storage({})

    assert sorted(pd.read_parquet(swept_run.catalog)["name"]) == sorted(read_parquet(run.catalog)["name"])
    assert read_parquet(run.catalog)["uri"].str.startswith(f"{bucket_zoo}/step").all()  # the catalog is the bucket's
    for name in TABLES:
        local, bucket = pd.read_parquet(getattr(swept_run, name)), read_parquet(getattr(run, name))
        keys = [c for c in ("checkpoint", "group", "sample_set", "benchmark", "metric", "sample_id", "kind")
                if c in local.columns]
        pd.testing.assert_frame_equal(local.sort_values(keys, ignore_index=True),
                                      bucket.sort_values(keys, ignore_index=True), check_like=True, obj=name)
    routing = read_parquet(run.root / "routing" / "step3")
    assert len(routing) == 40 and routing["sample_id"].is_unique  # nothing recorded twice
    assert run.report.read_text().lstrip().lower().startswith("<!doctype html")  # the report, in the bucket
    assert read_parquet(run.failures).empty
    assert not (run.root / ".lease").exists()  # released at the end
    assert "testing" not in run.config.read_text()  # credentials never go into the run dir
