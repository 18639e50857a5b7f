"""The tests' tiny toy zoo and its sweep, composed from the shipped configs (conf/pretrain_toy.yaml,
conf/experiment/toy.yaml) with the overrides that make them small: one definition for the
in-process tests and for the command lines of the job tests."""

from __future__ import annotations

from pathlib import Path

from moegrok.config import PretrainToyConfig, SweepConfig, compose_config

# p=11, 2 groups, 2 layers, 4 experts top-2: trains in seconds
TINY_ZOO = [
    "data.p=11", "data.groups=[{name:add,op:add,train_fraction:0.6},{name:mul,op:mul,train_fraction:0.5}]",
    "model.intermediate_size=32", "model.num_layers=2", "model.num_experts=4", "model.top_k=2",
    "train.max_steps=6", "train.save_every=3", "train.log_every=3",
]


def tiny_zoo_config(out_dir: str | Path, *overrides: str) -> PretrainToyConfig:
    """The tiny zoo's training config (checkpoints step0, step3, step6)."""
    return compose_config("pretrain_toy", [f"out_dir={out_dir}", *TINY_ZOO, *overrides])


def tiny_sweep_overrides(zoo: str | Path, run_dir: str | Path) -> list[str]:
    """`python jobs/sweep.py` overrides for a small sweep of the tiny zoo: the toy experiment at the
    tiny zoo's prime, 20 samples per group, the HF engine on 40 held-out items, no retries."""
    return ["experiment=toy", f"run_dir={run_dir}", f"checkpoints.dir={zoo}", "model.residue_tokens=11",
            "samples.max_per_group=20", "samples.shard_size=16", "eval.engine=hf",
            "eval.max_new_tokens=2", "eval.max_items=40", "record.max_retries=0", "eval.max_retries=0",
            "analysis.control=null", "progress=false"]


def tiny_sweep_config(zoo: str | Path, run_dir: str | Path, *overrides: str) -> SweepConfig:
    return compose_config("sweep", [*tiny_sweep_overrides(zoo, run_dir), *overrides])
