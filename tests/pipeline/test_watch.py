"""Watch mode: a sweep follows a checkpoint directory that a writer fills while it runs."""

import subprocess
import sys
import textwrap

import pandas as pd

from moegrok.pipeline import run_watch
from moegrok.store import RunDir
from tests.reference.toy import tiny_sweep_config

WRITER = textwrap.dedent("""
    # copies a zoo's checkpoints one by one the way a trainer writes them: weights in two halves,
    # then the tokenizer and config files; then the sentinel. After each write it waits until two
    # watch rounds have rewritten the catalog (the second one surely listed the directory after the
    # write), so every state is seen by the sweep: a file handshake, no sleeps tuned to its speed.
    import shutil, sys, time
    from pathlib import Path
    source, target, catalog = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) / "catalog.parquet"

    def seen_twice():
        stamps, since = set(), time.time_ns()
        while len(stamps) < 2:
            if catalog.exists() and (stamp := catalog.stat().st_mtime_ns) > since:
                stamps.add(stamp)
            time.sleep(0.02)

    for step in ("step0", "step3", "step6"):
        (target / step).mkdir(parents=True)
        weights = (source / step / "model.safetensors").read_bytes()
        with open(target / step / "model.safetensors", "wb") as f:
            f.write(weights[: len(weights) // 2])
        seen_twice()
        with open(target / step / "model.safetensors", "ab") as f:
            f.write(weights[len(weights) // 2 :])
        for file in sorted((source / step).iterdir()):
            if file.name != "model.safetensors":
                shutil.copy(file, target / step / file.name)
        seen_twice()
    (target / "DONE").touch()
""")


def test_watch_follows_a_directory_being_written(tiny_zoo, tmp_path, ray_cluster, capsys):
    target = tmp_path / "ckpts"
    target.mkdir()
    run = RunDir(tmp_path / "run")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tiny_zoo), str(target), str(run.root)])
    cfg = tiny_sweep_config(target, run.root, "eval.enabled=false", "metrics.routing_analyses.enabled=false",
                            f"samples.paths=[{tiny_zoo / 'samples.jsonl'}]", "watch.enabled=true",
                            "watch.poll_s=0.2", "watch.sentinel=DONE")
    try:
        assert run_watch(cfg) == 0
    finally:
        writer.wait(timeout=60)
    out = capsys.readouterr().out
    assert "waiting for 1 checkpoint(s) still being written" in out  # seen half-written, left for later
    assert out.count("watch: round") >= 3 and "(the last)" in out
    assert set(pd.read_parquet(run.metrics)["checkpoint"]) == {"step0", "step3", "step6"}
    assert not run.failures.exists() or pd.read_parquet(run.failures).empty  # a checkpoint being written never fails
