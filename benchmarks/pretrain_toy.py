"""Toy-zoo training speed and the wall time to the grokking criterion.

    python benchmarks/pretrain_toy.py            # trains the default zoo into a temp dir
    python benchmarks/pretrain_toy.py --steps 50   # steps/s only

The criterion: for at least 2 groups, held-out accuracy <= 0.3 at the step where train accuracy
first reaches 0.99, and >= 0.9 by the end. Time to criterion = wall time until the last of those
groups first reaches 0.9 held-out (interpolated from the logged steps' timing).
"""

import argparse
import tempfile
import time

import pandas as pd

from moegrok.config import PretrainToyConfig
from moegrok.toy.summary import grokking_summary
from moegrok.toy.train import train_toy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=0, help="only time this many steps (0 = the full default run)")
    args = parser.parse_args()
    cfg = PretrainToyConfig()
    if args.steps:
        cfg.train.max_steps = cfg.train.save_every = args.steps
    with tempfile.TemporaryDirectory() as out:
        cfg.out_dir = out
        start = time.perf_counter()
        train_toy(cfg, progress=False)
        seconds = time.perf_counter() - start
        log = pd.read_parquet(f"{out}/train_log.parquet")
    steps = cfg.train.max_steps
    print(f"{steps} steps in {seconds:.0f} s: {steps / seconds:.2f} steps/s ({seconds / steps * 1000:.0f} ms/step, "
          "incl. logging, live metrics and checkpoints)")
    if args.steps:
        return
    summary = grokking_summary(log)
    print(summary.to_string(index=False))
    grokked = summary[summary["status"] == "grokking"]
    if len(grokked) >= 2:
        last = grokked["generalization_step"].max()
        print(f"criterion met by {len(grokked)} groups; last generalization at step {last:.0f} "
              f"~ {seconds * last / steps:.0f} s of {seconds:.0f} s")
    else:
        print("criterion NOT met (fewer than 2 groups grokked)")


if __name__ == "__main__":
    main()
