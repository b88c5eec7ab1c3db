"""Stage `tokenize`: {id, text} Parquet -> token ids with their lengths, for length-bucketed batching.

    ingest output (or any Parquet with id, text)        only the listed shards, one read task each,
                                                        in blocks of a few tokenizer batches
      -> a fast tokenizer in Ray Data tasks             one tokenizer load per worker process
      -> long texts truncated or split into windows     `long_texts`, `max_length`, `stride`
      -> Parquet shards of {id, window, input_ids, length} + manifest

A text of n windows gives n rows with window = 0..n-1; every row starts and ends with the
tokenizer's special tokens and holds at most max_length ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from chuxin_ray import storage
from chuxin_ray.config import Config, ConfigError, TokenizeConfig
from chuxin_ray.data.shards import write_shard
from chuxin_ray.ray_cluster import connect

log = logging.getLogger(__name__)

STAGE = "tokenize"
SUBDIRS = ("data",)
SHARD_ROWS = 200_000  # rows per output file: ~100 MB of ids at length 128
TOKEN_SCHEMA = pa.schema(
    [("id", pa.string()), ("window", pa.int32()), ("input_ids", pa.list_(pa.int32())), ("length", pa.int32())]
)


@dataclass
class TokenizePlan:
    cfg: TokenizeConfig
    src: storage.Location
    inputs: list[str]  # filesystem paths of the input shards
    out: storage.Location
    config_hash: str
    manifest: dict | None
    tokenizer_json: str = ""  # the fast tokenizer, serialised once on the driver


def setup(cfg: Config, force: bool = False) -> TokenizePlan:
    section: TokenizeConfig = cfg.require(STAGE)
    out = storage.resolve(cfg.stage_output(STAGE), cfg.storage)
    config_hash = cfg.hash(STAGE)
    manifest = storage.begin_stage(STAGE, out, config_hash, force, SUBDIRS)
    src = storage.resolve(section.input or cfg.stage_output("ingest"), cfg.storage)
    if manifest:
        return TokenizePlan(section, src, [], out, config_hash, manifest)
    inputs = input_shards(src)
    tokenizer_json = load_tokenizer(section.tokenizer).backend_tokenizer.to_str()
    return TokenizePlan(section, src, inputs, out, config_hash, None, tokenizer_json)


def input_shards(src: storage.Location) -> list[str]:
    """The data shards a complete manifest lists, or every Parquet file under a plain folder."""
    manifest = storage.read_manifest(src)
    if manifest is not None:
        return [src.child(f["path"]).path for f in manifest["files"]["data"]]
    if storage.exists(src.child(storage.MANIFEST)):
        raise ConfigError(
            f"tokenize.input: {src.uri} is an incomplete stage output; rerun the stage that writes it"
        )
    try:
        files = storage.list_files(src, (".parquet",))
    except storage.StorageError:
        files = []
    if not files:
        raise ConfigError(
            f"tokenize.input: no Parquet files at {src.uri}; run `ingest` first or set tokenize.input"
        )
    return [f.path for f in files]


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenize.tokenizer: cannot load {name!r}: {e}") from None
    if not tok.is_fast:
        raise ConfigError(f"tokenize.tokenizer: {name!r} has no fast (Rust) tokenizer; windows need offsets")
    return tok


def run(plan: TokenizePlan, cfg: Config) -> dict:
    if plan.manifest is not None:
        return storage.report_complete(STAGE, plan.out, plan.manifest)
    started = time.time()
    connect(cfg.ray)
    section = plan.cfg
    # Plain read tasks, not read_parquet: its file listing took 8 s on the local S3 server before the
    # first row, and its repartition into small blocks held 3 CPUs for 14 s (bench/ingest.py, 1e6).
    # The reader asks for half a CPU so Ray Data does not fuse it with the tokenizer: each tokenizer
    # task takes one block of a few batches, so every core is busy whatever the number of shards.
    ds = ray.data.from_items([{"path": p} for p in plan.inputs], override_num_blocks=len(plan.inputs))
    ds = ds.map_batches(
        read_shards,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0.5,
        fn_kwargs={"fs": plan.src.fs, "rows_per_block": 4 * section.batch_size},
    )
    # Ray Data reserves each operator a share of the cluster: with several operators the tokenizer,
    # the only heavy one, ran one task at a time on 2 CPUs (bench/ingest.py). Object-store
    # backpressure still applies.
    ds.context.op_resource_reservation_enabled = False
    ds = ds.map_batches(
        tokenize_block,
        batch_size=section.batch_size,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=section.concurrency) if section.concurrency else None,
        fn_kwargs={
            "tokenizer_json": plan.tokenizer_json,
            "tokenizer_key": hashlib.sha256(plan.tokenizer_json.encode()).hexdigest()
            + f"-{section.max_length}-{section.long_texts}-{section.stride}",
            "max_length": section.max_length,
            "long_texts": section.long_texts,
            "stride": section.stride,
        },
    )
    # The writer asks for half a CPU (it encodes and uploads) so that Ray Data does not fuse it with
    # the tokenizer: fused, each task would take SHARD_ROWS texts, one task on a small corpus.
    summary = ds.map_batches(
        write_tokens, batch_size=SHARD_ROWS, batch_format="pyarrow", num_cpus=0.5, fn_kwargs={"out": plan.out}
    ).take_all()

    files = sorted(({"path": r["file"], "rows": r["rows"]} for r in summary), key=lambda f: f["path"])
    counts = {
        "texts": sum(r["texts"] for r in summary),
        "rows": sum(r["rows"] for r in summary),
        "over_max_length": sum(r["over_max_length"] for r in summary),
        "tokens": sum(r["tokens"] for r in summary),
        "length_histogram": _merge_histograms([r["length_histogram"] for r in summary]),
    }
    manifest = storage.stage_manifest(
        STAGE,
        plan.config_hash,
        cfg.redacted()[STAGE],
        inputs=[plan.src.uri],
        counts=counts,
        files={"data": files},
        started=started,
    )
    storage.write_manifest(plan.out, manifest)
    elapsed = max(time.time() - started, 1e-9)
    log.info(
        "%s: %d texts -> %d rows, %d tokens in %.1f s (%.0f texts/s)",
        STAGE,
        counts["texts"],
        counts["rows"],
        counts["tokens"],
        elapsed,
        counts["texts"] / elapsed,
    )
    return manifest


def main(cfg: Config, force: bool = False) -> dict:
    return run(setup(cfg, force), cfg)


# --------------------------------------------------------------------------------------------------
# Ray Data steps
# --------------------------------------------------------------------------------------------------


def read_shards(batch: pa.Table, fs, rows_per_block: int):
    """A Ray Data task: the {id, text} rows of the listed Parquet shards, `rows_per_block` at a time."""
    for path in batch.column("path").to_pylist():
        with fs.open_input_file(path) as f:
            for part in pq.ParquetFile(f).iter_batches(batch_size=rows_per_block, columns=["id", "text"]):
                yield pa.Table.from_batches([part])


_TOKENIZERS: dict[str, object] = {}  # per worker process: Ray reuses workers across tasks


def tokenize_block(
    batch: pa.Table, tokenizer_json: str, tokenizer_key: str, max_length: int, long_texts: str, stride: int
) -> pa.Table:
    """A Ray Data task. Plain tasks, not an actor pool: they use every free core as Ray schedules
    them, where a pool autoscaling from one actor stayed at one on a 2-core machine. The tokenizer
    arrives as JSON from the driver (which resolved the path or hub id once) and is built once per
    worker process, without importing transformers (~10 s)."""
    tok = _TOKENIZERS.get(tokenizer_key)
    if tok is None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread: Ray runs one task per core
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        tok.no_padding()
        tok.enable_truncation(max_length, stride=stride if long_texts == "window" else 0)
        _TOKENIZERS[tokenizer_key] = tok
    return tokenize_batch(tok, batch, long_texts)


def tokenize_batch(tok, batch: pa.Table, long_texts: str) -> pa.Table:
    """One `encode_batch` call for the whole batch; a long text's overflow gives its windows."""
    encodings = tok.encode_batch(batch.column("text").to_pylist())
    text_index, window, ids, windows = [], [], [], []
    for i, enc in enumerate(encodings):
        parts = [enc, *enc.overflowing] if long_texts == "window" else [enc]
        for w, part in enumerate(parts):
            text_index.append(i)
            window.append(w)
            ids.append(part.ids)
            windows.append(1 + len(enc.overflowing))
    return pa.table(
        {
            "id": batch.column("id").take(pa.array(text_index, pa.int64())),
            "window": pa.array(window, pa.int32()),
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "length": pa.array([len(r) for r in ids], pa.int32()),
            "windows": pa.array(windows, pa.int32()),  # 1 + overflow: > 1 means longer than max_length
        }
    )


def write_tokens(batch: pa.Table, out: storage.Location) -> pa.Table:
    windows = batch.column("windows").to_numpy()
    first = batch.column("window").to_numpy() == 0
    lengths = batch.column("length").to_numpy()
    rel = write_shard(out, "data", batch.select(TOKEN_SCHEMA.names).cast(TOKEN_SCHEMA))
    return pa.table(
        {
            "file": [rel],
            "rows": [batch.num_rows],
            "texts": [int(first.sum())],
            "over_max_length": [int((windows[first] > 1).sum())],
            "tokens": [int(lengths.sum())],
            "length_histogram": [_histogram(lengths)],
        }
    )


def _histogram(lengths: np.ndarray) -> str:
    """Rows per power-of-two length bucket, as JSON (Arrow keeps one schema across tasks)."""
    buckets = np.maximum(0, np.ceil(np.log2(np.maximum(lengths, 1)))).astype(int)
    values, counts = np.unique(buckets, return_counts=True)
    return json.dumps({str(2 ** int(v)): int(c) for v, c in zip(values, counts, strict=True)})


def _merge_histograms(parts: list[str]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for k, v in json.loads(part).items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items(), key=lambda kv: int(kv[0])))
