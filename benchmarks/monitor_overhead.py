"""Training-step time of the toy zoo with and without the live pathway monitor.

    python benchmarks/monitor_overhead.py [--steps 100]

Trains the default toy config twice from scratch for --steps steps (full batch, 2 threads), once
with the monitor at the default interval (every logging step, 64 probe samples per group, all
and answer positions) and once without, and prints the time per step and the overhead ratio.
"""

import argparse
import tempfile
import time

from moegrok.config import PretrainToyConfig
from moegrok.toy.train import train_toy


def seconds_per_step(steps: int, per_group: int) -> float:
    cfg = PretrainToyConfig()
    cfg.train.max_steps, cfg.train.save_every = steps, steps
    cfg.train.monitor_samples_per_group = per_group
    with tempfile.TemporaryDirectory() as out:
        cfg.out_dir = out
        start = time.perf_counter()
        train_toy(cfg, progress=False)
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    interval = PretrainToyConfig().train.log_every
    without = seconds_per_step(args.steps, 0)
    with_monitor = seconds_per_step(args.steps, PretrainToyConfig().train.monitor_samples_per_group)
    print(f"without monitor: {without * 1000:.0f} ms/step; with monitor every {interval} steps: "
          f"{with_monitor * 1000:.0f} ms/step -> overhead {with_monitor / without - 1:+.1%} (target <= 10%)")


if __name__ == "__main__":
    main()
