"""Sweeps of hundreds of real HF checkpoints, end to end (record, reduce, evaluate, analyze,
report), at 20, 100 and 300 checkpoints in one run; then a re-run with nothing new, and 10 more
checkpoints added to the finished 300-sweep against a fresh 10-checkpoint sweep.

    python benchmarks/scale.py                     # trains zoo/scale (the toy saved every step) once
    python benchmarks/scale.py --sizes 20,100 --extra 5

Every sweep runs in a process of its own (a fresh driver, like `python jobs/sweep.py`), which
reports its peak RSS; per stage the table shows wall time per checkpoint, what the driver received
from the workers per checkpoint (receipts only), and bytes on disk per checkpoint. Targets:
per-checkpoint time at the largest size <= 1.1x the smallest's, driver peak RSS <= 1.5x, the
report <= 5 MB; a re-run with nothing new <= 10 s; adding 10 checkpoints <= 1.2x a 10-checkpoint
sweep plus the fixed overhead.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def train_zoo(zoo: Path, num_checkpoints: int) -> None:
    """The default toy recipe saved at every step (resumes a partial zoo)."""
    from moegrok.config import compose_config
    from moegrok.toy.train import train_toy

    train_toy(compose_config("pretrain_toy", [f"out_dir={zoo}", f"train.max_steps={num_checkpoints - 1}",
                                              "train.save_every=1", "train.log_every=25",
                                              "train.live_metrics.enabled=false"]))


def overrides(zoo: Path, run_dir: Path, *extra: str, **selection) -> list[str]:
    """The toy sweep (conf/experiment/toy.yaml) of `zoo`."""
    return ["experiment=toy", f"run_dir={run_dir}", f"checkpoints.dir={zoo}", "progress=false",
            *(f"checkpoints.{key}={value}" for key, value in selection.items()), *extra]


def one_sweep(args: list[str]) -> dict:
    """In this process: run the sweep, then report its stages, peak RSS and sizes (a JSON line)."""
    from moegrok.config import compose_config
    from moegrok.pipeline import run_sweep
    from moegrok.store import RunDir

    cfg = compose_config("sweep", args)
    start = time.perf_counter()
    status = run_sweep(cfg)
    seconds = time.perf_counter() - start
    run = RunDir(cfg.run_dir)
    stages = pd.read_parquet(run.stages)
    disk = {part: sum(p.stat().st_size for p in (run.root / part).rglob("*") if p.is_file())
            for part in ("routing", "sample_metrics", "parts", "eval")}
    return {"status": status, "seconds": seconds, "stages": stages.to_dict("records"), "disk": disk,
            "checkpoints": len(pd.read_parquet(run.catalog)), "report_bytes": run.report.stat().st_size,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def sweep(zoo: Path, run_dir: Path, *extra: str, **selection) -> dict:
    command = [sys.executable, __file__, "--one", json.dumps(overrides(zoo, run_dir, *extra, **selection))]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise SystemExit(f"sweep of {run_dir} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def per_checkpoint(result: dict) -> dict:
    n = result["checkpoints"]
    row = {"checkpoints": n, "wall s/ckpt": result["seconds"] / n, "driver peak RSS MB": result["peak_rss_mb"],
           "report MB": result["report_bytes"] / 1e6}
    for stage in result["stages"]:
        row[f"{stage['stage']} s/ckpt"] = stage["seconds"] / n
        row[f"{stage['stage']} KB recv/ckpt"] = stage["bytes_received"] / n / 1e3
    row["disk MB/ckpt"] = sum(result["disk"].values()) / n / 1e6
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / "zoo" / "scale")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--sizes", default="20,100,300")
    parser.add_argument("--extra", type=int, default=10)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    largest = max(sizes)
    start = time.perf_counter()
    train_zoo(args.zoo, largest + args.extra)
    print(f"zoo: {largest + args.extra} checkpoints in {args.zoo} ({time.perf_counter() - start:.0f} s)", flush=True)
    results = {}
    for size in sizes:  # the same stretch of training, spaced out: comparable work per checkpoint
        results[size] = sweep(args.zoo, args.runs / f"n{size}", max_step=largest - 1, num_evenly_spaced=size)
        print(f"{size} checkpoints: {results[size]['seconds']:.0f} s", flush=True)
    table = pd.DataFrame([per_checkpoint(results[size]) for size in sizes]).set_index("checkpoints").T
    print("\nper checkpoint, by sweep size\n" + table.to_string(float_format=lambda x: f"{x:.3g}"))
    small, big = results[min(sizes)], results[largest]
    time_ratio = (big["seconds"] / largest) / (small["seconds"] / min(sizes))
    rss_ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    print(f"\nper-checkpoint time {largest} vs {min(sizes)}: {time_ratio:.2f}x (target <= 1.1x); driver peak RSS "
          f"{rss_ratio:.2f}x (target <= 1.5x); report at {largest}: {big['report_bytes'] / 1e6:.2f} MB (<= 5 MB)")

    again = sweep(args.zoo, args.runs / f"n{largest}", max_step=largest - 1, num_evenly_spaced=largest)
    recomputed = sum(stage["done"] for stage in again["stages"])
    print(f"re-run of the {largest}-sweep with nothing new: {again['seconds']:.1f} s, {recomputed} units recomputed "
          "(target <= 10 s, 0 units)")
    # the retrospective quantities (the memorized set, saturation against the last checkpoint) need
    # the last checkpoint: adding one recomputes them for every checkpoint; the monitors alone do not
    monitor_only = ("metrics.sample_sets=[all]", "metrics.routing_analyses.saturation_reference=none")
    shutil.copytree(args.runs / f"n{largest}", args.runs / f"n{largest}_monitors", dirs_exist_ok=True)
    fresh = sweep(args.zoo, args.runs / f"fresh{args.extra}", min_step=largest, max_step=largest + args.extra - 1)
    added = {"all metrics": sweep(args.zoo, args.runs / f"n{largest}", max_step=largest + args.extra - 1),
             "monitors only": sweep(args.zoo, args.runs / f"n{largest}_monitors", *monitor_only,
                                    max_step=largest + args.extra - 1)}
    for name, result in added.items():
        print(f"{args.extra} checkpoints added to the {largest}-sweep ({name}): {result['seconds']:.1f} s; a fresh "
              f"{args.extra}-checkpoint sweep: {fresh['seconds']:.1f} s -> {result['seconds'] / fresh['seconds']:.2f}x "
              "(target <= 1.2x plus the fixed overhead)")
    for name, result in (*added.items(), ("fresh", fresh)):
        print(f"  {name}: " + ", ".join(f"{s['stage']} {s['done']}/{s['units']} units {s['seconds']:.1f} s"
                                        for s in result["stages"]))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(one_sweep(json.loads(sys.argv[2]))))
    else:
        main()
