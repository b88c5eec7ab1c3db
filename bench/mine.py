"""Mining throughput: the `mine` stage's search-and-sample step against brute-force numpy, on the same
embeddings.

    .venv/bin/python bench/mine.py                                  # 20k queries x 200k passages, H=384
    .venv/bin/python bench/mine.py --queries 5000 --corpus 50000 --dim 256

Embeddings are generated (clustered unit vectors: ranks are not a coin toss) and written in the
stage's layout (embeddings/corpus/shard-*.parquet, embeddings/queries/shard-*.parquet), then:
  stage   mine.search_shard as the stage runs it: one Ray task per query shard on a local Ray with
          all cores, the corpus streamed shard by shard from disk, exact top-k (retrieval/topk.py),
          positives excluded by id, negatives sampled from ranks [10, 210), texts looked up
  numpy   everything in memory: Q @ C.T in chunks of 1024 queries (BLAS on all cores),
          np.argpartition + sort for the top 210, the same sampling rule
Prints queries/s of each (the stage's encoder time is not included: both start from embeddings)
and checks that the two agree on the top-k up to float ties.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RANGE = (10, 210)
NEGATIVES = 15


def embeddings(n: int, dim: int, centers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, dim) float32 unit vectors around random centers."""
    x = centers[rng.integers(len(centers), size=n)] + 0.5 * rng.standard_normal((n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_layout(root: Path, corpus: np.ndarray, queries: np.ndarray, shard_rows: int, query_shard_rows: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chuxin_ray.stages.mine import embedding_array

    (root / "embeddings" / "corpus").mkdir(parents=True)
    (root / "embeddings" / "queries").mkdir(parents=True)
    corpus_paths, query_paths = [], []
    for k, start in enumerate(range(0, len(corpus), shard_rows)):
        rows = np.arange(start, min(start + shard_rows, len(corpus)))
        path = root / "embeddings" / "corpus" / f"shard-{k:05d}.parquet"
        pq.write_table(
            pa.table(
                {
                    "row": pa.array(rows, pa.int64()),
                    "id": [f"doc-{i}" for i in rows],
                    "text": [f"passage {i}" for i in rows],
                    "embedding": embedding_array(corpus[rows]),
                }
            ),
            path,
        )
        corpus_paths.append(str(path))
    for k, start in enumerate(range(0, len(queries), query_shard_rows)):
        rows = np.arange(start, min(start + query_shard_rows, len(queries)))
        path = root / "embeddings" / "queries" / f"shard-{k:05d}.parquet"
        pq.write_table(
            pa.table(
                {
                    "query_id": [f"q-{i}" for i in rows],
                    "passage_id": [f"doc-{i}" for i in rows],  # query i's positive is doc-i
                    "query": [f"query {i}" for i in rows],
                    "passage": [f"passage {i}" for i in rows],
                    "source": ["bench"] * len(rows),
                    "embedding": embedding_array(queries[rows]),
                }
            ),
            path,
        )
        query_paths.append(str(path))
    return corpus_paths, query_paths


def numpy_mining(queries: np.ndarray, corpus: np.ndarray, seed: int) -> tuple[list[list[int]], np.ndarray]:
    """The same rule in memory: top 210 by a BLAS matmul, positives removed by id, 15 sampled."""
    lo, hi = RANGE
    negatives, tops = [], []
    for start in range(0, len(queries), 1024):
        scores = queries[start : start + 1024] @ corpus.T  # (C, N)
        part = np.argpartition(-scores, hi - 1, axis=1)[:, :hi]  # (C, hi) unordered
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(part, order, axis=1)  # (C, hi) best first
        tops.append(top)
        for i, row in enumerate(top, start):
            rng = random.Random(seed * 1_000_003 + i)
            pool = [int(r) for r in row[lo:hi] if r != i]  # query i's positive is row i
            negatives.append(rng.sample(pool, NEGATIVES) if len(pool) > NEGATIVES else pool)
    return negatives, np.concatenate(tops)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--corpus", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--corpus-shard-rows", type=int, default=50_000)
    parser.add_argument("--query-shard-rows", type=int, default=10_000)
    args = parser.parse_args()

    import ray

    from chuxin_ray import storage
    from chuxin_ray.config import MineConfig, RayConfig
    from chuxin_ray.ray_cluster import connect
    from chuxin_ray.stages import mine

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((256, args.dim))
    corpus = embeddings(args.corpus, args.dim, centers, rng)
    queries = embeddings(args.queries, args.dim, centers, rng)
    root = Path(tempfile.mkdtemp(prefix="bench-mine-"))
    corpus_paths, query_paths = write_layout(
        root, corpus, queries, args.corpus_shard_rows, args.query_shard_rows
    )
    out = storage.resolve(str(root))
    cores = os.cpu_count() or 1
    section = MineConfig(
        encoder="unused",
        range_start=RANGE[0],
        range_end=RANGE[1],
        negative_number=NEGATIVES,
        runtime={"num_cpus": max(1, cores // max(1, len(query_paths)))},
    )

    connect(RayConfig(num_cpus=cores))
    search = ray.remote(mine.search_shard).options(num_cpus=section.runtime.num_cpus)
    ray.get(search.remote(out, query_paths[0], corpus_paths[:1], args.corpus_shard_rows, section, "warmup"))
    started = time.perf_counter()
    stats = ray.get(
        [
            search.remote(out, q, corpus_paths, args.corpus, section, f"shard-{k:05d}")
            for k, q in enumerate(query_paths)
        ]
    )
    stage_s = time.perf_counter() - started
    assert sum(s["queries"] for s in stats) == args.queries

    started = time.perf_counter()
    _, numpy_top = numpy_mining(queries, corpus, seed=0)
    numpy_s = time.perf_counter() - started

    # Agreement on the top 30 of 200 queries: the same scores at each rank (ties may swap ids).
    _, stage_top = mine.top_rows(queries[:200], out, corpus_paths, 30, MineConfig(query_chunk=1024), "cpu")
    exact = queries[:200].astype(np.float64) @ corpus.astype(np.float64).T
    gap = np.abs(np.take_along_axis(exact, stage_top, 1) - np.take_along_axis(exact, numpy_top[:200, :30], 1))
    print(
        f"\n{args.queries} queries x {args.corpus} passages, dim {args.dim}, {cores} cores, "
        f"ranks {RANGE[0]}-{RANGE[1]}, {NEGATIVES} negatives"
    )
    print(
        f"  stage  {stage_s:7.2f} s  {args.queries / stage_s:9.0f} queries/s  (search, sampling, text lookup, jsonl)"
    )
    print(f"  numpy  {numpy_s:7.2f} s  {args.queries / numpy_s:9.0f} queries/s  (in memory, no I/O)")
    print(f"  ratio stage/numpy: {numpy_s / stage_s:.2f}x; top-30 score gap max {gap.max():.2e}")
    ray.shutdown()


if __name__ == "__main__":
    main()
