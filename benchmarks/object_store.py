"""The toy sweep with its run dir in an S3 bucket (a real S3 server on loopback: moto's server
mode) against the same sweep on local disk, and what that costs at OLMoE-1B-7B's shape.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python -m benchmarks.object_store --checkpoints 24 --rounds 2

Trains zoo/object_store (the toy recipe saved at every step) once. Each round sweeps 3 and
--checkpoints checkpoints end to end (record, reduce, evaluate, analyze, report), local disk and
bucket interleaved, on one local Ray whose start-up is excluded; the per-checkpoint cost is the
slope between the two sizes. Requests are counted from the S3 server's request log (by method),
bytes written as the objects the run leaves in the bucket, bytes read from the GETs' objects.
Loopback S3 has no network latency: a real bucket adds a round trip per request, which the
request count prices. Then the request and byte counts per checkpoint at the paper's protocol.
"""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP')
BUCKET = "moegrok-bench"


def start_s3(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    return server, f"http://127.0.0.1:{port}"


def requests(log: Path, since: int) -> tuple[Counter, list[str], int]:
    """Requests logged after line `since`, by method; the GET paths; the log's line count."""
    lines = log.read_text(errors="replace").splitlines()
    counted, gets = Counter(), []
    for line in lines[since:]:
        match = LOG_LINE.search(line)
        if match:
            method, path = match.groups()
            kind = "LIST" if method == "GET" and ("list-type" in path or path.rstrip("/") == f"/{BUCKET}") else method
            counted[kind] += 1
            if kind == "GET":
                gets.append(path.split("?")[0].removeprefix(f"/{BUCKET}/"))
    return counted, gets, len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / "zoo" / "object_store")
    parser.add_argument("--checkpoints", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moegrok-object-store-"))
    log = work / "s3.log"
    server, endpoint = start_s3(log)
    # the way a user passes them, before Ray starts (its workers inherit them)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    import boto3

    from moegrok.config import ClusterConfig, compose_config
    from moegrok.pipeline import run_sweep
    from moegrok.pipeline.cluster import init_ray
    from moegrok.store import as_path, read_parquet

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    if not (args.zoo / "zoo.yaml").exists() or len(list(args.zoo.glob("step*"))) < args.checkpoints:
        from moegrok.toy.train import train_toy

        train_toy(compose_config("pretrain_toy", [f"out_dir={args.zoo}", f"train.max_steps={args.checkpoints - 1}",
                                                  "train.save_every=1", "train.log_every=25",
                                                  "train.live_metrics.enabled=false"]), progress=False)
    start = time.perf_counter()
    init_ray(ClusterConfig(num_cpus=2))
    print(f"ray start-up {time.perf_counter() - start:.1f} s (excluded below)")

    def sweep(run_dir: str, checkpoints: int) -> float:
        cfg = compose_config("sweep", ["experiment=toy", f"run_dir={run_dir}", f"checkpoints.dir={args.zoo}",
                                       f"checkpoints.num_evenly_spaced={checkpoints}", "progress=false"])
        start = time.perf_counter()
        assert run_sweep(cfg) == 0, run_dir
        return time.perf_counter() - start

    sizes = (3, args.checkpoints)
    sweep(str(work / "warm-up"), 3)  # imports, Ray worker processes
    rows = []
    for round_ in range(args.rounds):
        for n in sizes:
            local = work / f"local-{round_}-{n}"
            seconds = sweep(str(local), n)
            rows.append({"where": "local", "round": round_, "checkpoints": n, "seconds": seconds,
                         "bytes written": sum(p.stat().st_size for p in local.rglob("*") if p.is_file())})
            shutil.rmtree(local)
            url = f"s3://{BUCKET}/run-{round_}-{n}"
            _, _, before = requests(log, 0)
            seconds = sweep(url, n)
            time.sleep(0.5)  # the server's log catches up
            counted, gets, _ = requests(log, before)
            objects = {info.path.removeprefix(f"{BUCKET}/"): info.size
                       for info in as_path(url).listing(recursive=True) if info.size is not None}
            units = read_parquet(as_path(url) / "stages.parquet")["done"].sum()
            rows.append({"where": "s3", "round": round_, "checkpoints": n, "seconds": seconds, "units": units,
                         "bytes written": sum(objects.values()),
                         "bytes read": sum(objects.get(path, 0) for path in gets),
                         "requests": sum(counted.values()), **{f"{kind}": counted[kind] for kind in
                                                                ("PUT", "GET", "HEAD", "LIST", "DELETE", "POST")}})
    server.kill()
    shutil.rmtree(work, ignore_errors=True)
    table = pd.DataFrame(rows).groupby(["where", "checkpoints"]).median(numeric_only=True).drop(columns="round")
    print(table.round(1).to_string())
    small, large = sizes
    per = {where: (table.loc[(where, large)] - table.loc[(where, small)]) / (large - small)
           for where in ("local", "s3")}
    total = {where: table.loc[(where, large), "seconds"] for where in ("local", "s3")}
    print(f"\nper extra checkpoint: local {per['local']['seconds']:.2f} s, s3 {per['s3']['seconds']:.2f} s; "
          f"{large} checkpoints: local {total['local']:.1f} s, s3 {total['s3']:.1f} s -> "
          f"{total['s3'] / total['local']:.2f}x")
    s3 = per["s3"]
    print(f"s3 per extra checkpoint: {s3['requests']:.0f} requests (PUT {s3['PUT']:.0f}, GET {s3['GET']:.0f}, "
          f"HEAD {s3['HEAD']:.0f}, LIST {s3['LIST']:.0f}, DELETE {s3['DELETE']:.0f}, POST {s3['POST']:.0f}), "
          f"{s3['bytes written'] / 1e3:.0f} kB written, {s3['bytes read'] / 1e3:.0f} kB read")
    olmoe(s3)


def olmoe(per_toy: pd.Series) -> None:
    """Requests and bytes per checkpoint at the paper's protocol (conf/samples/olmoe.yaml: 4 groups
    x 10,000 samples in shards of 500, ~300 tokens per sample; bytes per token from
    benchmarks/storage.py, docs/scale.md): the toy's requests per unit times the units of one OLMoE
    checkpoint, plus the extra part uploads of objects larger than pyarrow's 10 MiB parts."""
    per_unit = per_toy["requests"] / per_toy["units"]
    shards, tokens, part = 4 * 10_000 // 500, 4 * 10_000 * 300, 10 * 2**20
    # record and features: one unit per shard each; metrics per sample set (2), memorization
    # and routing analyses: ~10; evaluate: 4 benchmarks
    units = 2 * shards + 10 + 4
    print(f"\nrequests per unit on the toy: {per_unit:.1f} ({per_toy['units']:.1f} units per checkpoint)")
    for storage, per_token in (("tokens", 262.0), ("compact", 39.4)):
        routing = tokens * per_token
        shard = routing / shards
        parts = shards * (-(-shard // part) + 1) if shard > part else 0  # beyond one PUT: parts + start + complete
        count = units * per_unit + parts
        print(f"OLMoE-1B-7B, record.storage={storage}: {routing / 1e9:.2f} GB of routing per checkpoint in {shards} "
              f"shards of {shard / 1e6:.0f} MB; ~{count:.0f} requests per checkpoint ({units} units x {per_unit:.1f}"
              f" + {parts:.0f} part uploads), ~{2 * routing / 1e9:.2f} GB moved (written once, read once by the "
              f"reduce); x 500 revisions: ~{500 * count / 1e3:.0f}k requests, {500 * routing / 1e12:.2f} TB stored")


if __name__ == "__main__":
    main()
