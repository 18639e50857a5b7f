"""Training-step time of the toy zoo with and without live pathway metrics.

    python benchmarks/live_metrics_overhead.py [--steps 100]

Trains the default toy config twice from scratch for --steps steps (full batch, 2 threads), once
with live metrics at the default interval (every logging step, 64 probe samples per group, all
and answer positions) and once without, and prints the time per step and the overhead ratio.
"""

import argparse
import tempfile
import time

from moegrok.config import PretrainToyConfig, compose_config
from moegrok.toy.train import train_toy


def seconds_per_step(steps: int, *, live: bool) -> float:
    with tempfile.TemporaryDirectory() as out:
        cfg: PretrainToyConfig = compose_config("pretrain_toy", [
            f"out_dir={out}", f"train.max_steps={steps}", f"train.save_every={steps}",
            f"train.live_metrics.enabled={str(live).lower()}"])
        start = time.perf_counter()
        train_toy(cfg, progress=False)
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    interval = PretrainToyConfig().train.log_every
    without = seconds_per_step(args.steps, live=False)
    with_live = seconds_per_step(args.steps, live=True)
    print(f"without live metrics: {without * 1000:.0f} ms/step; with live metrics every {interval} steps: "
          f"{with_live * 1000:.0f} ms/step -> overhead {with_live / without - 1:+.1%} (target <= 10%)")


if __name__ == "__main__":
    main()
