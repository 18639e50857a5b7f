"""What a sweep checks before it writes the first file of its run directory: each mistake a one-line
UserError that says what to fix, and nothing written (moegrok/pipeline/preflight.py)."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from moegrok.errors import UserError
from moegrok.pipeline import run_sweep
from tests.reference.toy import tiny_sweep_config


def assert_refused(cfg, message: str) -> None:
    with pytest.raises(UserError, match=message) as error:
        run_sweep(cfg)
    assert "\n" not in str(error.value)
    assert not Path(cfg.run_dir).exists()  # not a file of the run dir written


def test_config_values_that_do_not_fit_the_inputs_stop_the_sweep_at_once(tiny_zoo, tmp_path):
    run = tmp_path / "run"
    assert_refused(tiny_sweep_config(tiny_zoo, run, "model.residue_tokens=47"),
                   r"model.residue_tokens=47: .* tokens 0..46 as single tokens .* 36 are not \(first: '11'\)")
    assert_refused(tiny_sweep_config(tiny_zoo, run, "analysis.control=sub"),
                   r"analysis.control='sub': no such group in the samples \(groups: add, mul\)")
    assert_refused(tiny_sweep_config(tiny_zoo, run, "samples.max_tokens=3", "samples.truncation=error"),
                   r"samples cut to samples.max_tokens=3 \(samples.truncation=error\): add: 20 sample\(s\) lost")
    long_answers = tmp_path / "benchmark.jsonl"
    long_answers.write_text(json.dumps({"id": "q", "group": "add", "kind": "exact", "prompt": "1 + 1 =",
                                        "answer": "2 + 0"}) + "\n")
    assert_refused(tiny_sweep_config(tiny_zoo, run, "eval.max_new_tokens=2",
                                     f"eval.benchmarks=[{{name: long, path: {long_answers}}}]"),
                   r"eval.max_new_tokens=2: benchmark 'long' has exact answers of up to 3 tokens \(item 'q'\)")


def test_a_checkpoint_directory_without_checkpoints_names_the_pattern_and_what_is_there(tiny_zoo, tmp_path):
    ckpts = tmp_path / "ckpts"
    for name in ("model_a", "model_b", "logs"):
        shutil.copytree(tiny_zoo / "step3", ckpts / name)
    cfg = tiny_sweep_config(ckpts, tmp_path / "run", f"samples.paths=[{tiny_zoo / 'samples.jsonl'}]",
                            "eval.enabled=false")
    assert_refused(cfg, r"checkpoints.dir=.*ckpts': no subdirectory matches checkpoints.pattern='step\*' with a "
                        r"checkpoint name \(.*checkpoint-500 \(HF Trainer\).*\); its entries: logs/, model_a/, "
                        r"model_b/")


def test_the_common_checkpoint_layouts_are_read_by_default(tiny_zoo, tmp_path, capsys):
    from moegrok.config import CheckpointsConfig
    from moegrok.data.checkpoints import build_catalog

    ckpts = tmp_path / "ckpts"
    for name in ("checkpoint-500", "global_step600", "iter_0000700", "step800-tokens2B", "runs"):
        (ckpts / name).mkdir(parents=True)
    refs = build_catalog(CheckpointsConfig(dir=str(ckpts)))
    assert [(ref.name, ref.step) for ref in refs] == [("checkpoint-500", 500), ("global_step600", 600),
                                                      ("iter_0000700", 700), ("step800-tokens2B", 800)]
    assert "left out 1 subdirectory whose names are not checkpoint names: runs" in capsys.readouterr().out


def test_truncation_is_reported_per_group(tiny_zoo, tmp_path, ray_cluster, capsys):
    cfg = tiny_sweep_config(tiny_zoo, tmp_path / "run", "samples.max_tokens=4", "eval.enabled=false")
    assert run_sweep(cfg, stages=["record"]) == 0
    out = capsys.readouterr().out
    assert "samples cut to samples.max_tokens=4: add: 20 sample(s) lost" in out
    assert "mul: 20 sample(s) lost" in out and "(samples.truncation=error makes this an error)" in out
    samples = pd.read_parquet(Path(cfg.run_dir) / "samples.parquet")
    assert (samples["num_tokens"] == 4).all()
