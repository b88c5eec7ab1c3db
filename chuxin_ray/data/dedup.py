"""Exact deduplication across the whole corpus by a hash of the normalised text, shuffling keys only.

The texts never move for deduplication (see stages/ingest.py):
  1. Where a block is read, its kept rows are written as one shard, and `key_table` gives one small
     row per kept text: a 128-bit blake2b hash of its normalised text (two int64 columns), its global
     `order` and where it sits (`shard`, `pos`). 32 bytes a row, against ~300 for the row itself.
     128 bits: at 1e9 texts a 64-bit hash would already merge two distinct texts with probability
     ~3%, 128 bits ~1e-21.
  2. The keys are split by KEY (`split_by`) into partitions, so every copy of a text sits in one
     partition and `find_duplicates` on a whole partition is global: of each group of equal keys the
     row with the lowest `order` (first file, first row) stays, the others are returned as (shard, pos).
  3. Those are split by SHARD into groups, and `drop_rows` rewrites each shard that holds a duplicate.
No worker ever holds every hash: each holds the keys of its own partitions.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from chuxin_ray.data.cleaning import normalize_for_dedup

KEY = "dedup_key"  # high 64 bits: the shuffle key
KEY_LOW = "dedup_key_low"  # low 64 bits
ORDER = "order"  # file_index * 2**32 + row: which copy comes first
SHARD = "shard"  # the shard the text was written to (an id the ingest stage names files by)
POS = "pos"  # its row in that shard
KEY_SCHEMA = pa.schema(
    [(KEY, pa.int64()), (KEY_LOW, pa.int64()), (ORDER, pa.int64()), (SHARD, pa.int64()), (POS, pa.int32())]
)
ROW_SCHEMA = pa.schema([(SHARD, pa.int64()), (POS, pa.int32())])


def text_hashes(texts: pa.Array, mode: str) -> np.ndarray:
    """(n, 2) int64: blake2b-128 of each normalised text."""
    normalised = normalize_for_dedup(texts, mode).to_pylist()
    digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in normalised)
    return np.frombuffer(digests, dtype="<i8").reshape(-1, 2)  # (n, 2)


def key_table(texts: pa.Array, order: np.ndarray, shard: int, mode: str) -> pa.Table:
    """One KEY_SCHEMA row per text of one shard, in shard order."""
    keys = text_hashes(texts, mode)  # (n, 2)
    n = len(texts)
    return pa.table(
        [
            keys[:, 0],
            keys[:, 1],
            np.asarray(order, np.int64),
            np.full(n, shard, np.int64),
            np.arange(n, dtype=np.int32),
        ],
        schema=KEY_SCHEMA,
    )


def find_duplicates(keys: pa.Table) -> pa.Table:
    """Within one hash partition of KEY_SCHEMA rows: (shard, pos) of all rows but the first (lowest
    order) of each key, as ROW_SCHEMA."""
    if keys.num_rows < 2:
        return ROW_SCHEMA.empty_table()
    high = keys.column(KEY).to_numpy()  # (K,)
    low = keys.column(KEY_LOW).to_numpy()  # (K,)
    by_key = np.lexsort((keys.column(ORDER).to_numpy(), low, high))  # (K,) by key, then by order
    high, low = high[by_key], low[by_key]
    repeat = by_key[1:][(high[1:] == high[:-1]) & (low[1:] == low[:-1])]  # (D,) rows after the first
    return pa.table(
        [keys.column(SHARD).to_numpy()[repeat], keys.column(POS).to_numpy()[repeat]], schema=ROW_SCHEMA
    )


def partition_of(values: np.ndarray, parts: int) -> np.ndarray:
    """(n,) int64 in [0, parts) for (n,) int64 `values`: a multiplicative hash (Fibonacci hashing) of
    each, so ids with structure (shard ids count blocks in their low bits) spread as evenly as keys."""
    mixed = values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2**64
    return ((mixed >> np.uint64(32)) % np.uint64(parts)).astype(np.int64)


def split_by(table: pa.Table, column: str, parts: int) -> list[pa.Table]:
    """`table`'s rows as `parts` tables, row i in table partition_of(column[i]); order kept within each."""
    part = partition_of(table.column(column).to_numpy(), parts)  # (n,)
    by_part = np.argsort(part, kind="stable")  # (n,)
    bounds = np.searchsorted(part[by_part], np.arange(parts + 1))  # (parts + 1,)
    table = table.take(by_part)
    return [table.slice(start, end - start) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def drop_rows(table: pa.Table, positions: np.ndarray) -> pa.Table:
    """`table` without the rows at `positions`."""
    keep = np.ones(table.num_rows, dtype=bool)
    keep[positions] = False
    return table.filter(pa.array(keep))
