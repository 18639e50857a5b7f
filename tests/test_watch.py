"""Watch mode: the monitor follows a checkpoint directory that a writer fills while it runs."""

import subprocess
import sys
import textwrap

import pandas as pd

from moegrok.pipeline import watch
from moegrok.store import RunDir
from tests.helpers import monitor_config

WRITER = textwrap.dedent("""
    # copies a zoo's checkpoints one by one the way a trainer writes them: weights in two halves,
    # then the tokenizer and config files, a pause between; then the sentinel
    import shutil, sys, time
    from pathlib import Path
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    for step in ("step0", "step3", "step6"):
        (target / step).mkdir(parents=True)
        weights = (source / step / "model.safetensors").read_bytes()
        with open(target / step / "model.safetensors", "wb") as f:
            f.write(weights[: len(weights) // 2])
            f.flush()
            time.sleep(1.5)
            f.write(weights[len(weights) // 2 :])
        time.sleep(1.5)
        for file in sorted((source / step).iterdir()):
            if file.name != "model.safetensors":
                shutil.copy(file, target / step / file.name)
        time.sleep(1.0)
    (target / "DONE").touch()
""")


def test_watch_follows_a_directory_being_written(tiny_zoo, tmp_path, ray_cluster, capsys):
    target = tmp_path / "ckpts"
    target.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tiny_zoo), str(target)])
    cfg = monitor_config(target, tmp_path / "run", eval__enabled=False)
    cfg.samples.paths = [str(tiny_zoo / "samples.jsonl")]
    cfg.watch.enabled, cfg.watch.poll_s, cfg.watch.sentinel = True, 1.0, "DONE"
    try:
        assert watch(cfg) == 0
    finally:
        writer.wait(timeout=60)
    out = capsys.readouterr().out
    assert "waiting for 1 checkpoint(s) still being written" in out  # seen half-written, left for later
    assert out.count("watch: round") >= 3 and "(the last)" in out
    run = RunDir(cfg.run_dir)
    assert set(pd.read_parquet(run.metrics)["checkpoint"]) == {"step0", "step3", "step6"}
    assert not run.failures.exists() or pd.read_parquet(run.failures).empty  # a checkpoint being written never fails
