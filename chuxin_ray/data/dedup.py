"""Exact deduplication across the whole corpus by a hash of the normalised text.

Two steps around a hash shuffle (see stages/ingest.py):
  1. `add_dedup_key`: a 128-bit blake2b hash of each kept row's normalised text, as two int64
     columns (128 bits: at 1e9 texts a 64-bit hash would already merge two distinct texts with
     probability ~3%, 128 bits ~1e-21).
  2. After `repartition(keys=[KEY])` every copy of a text sits in the same partition, so
     `mark_duplicates` on a whole partition is global: of each group of equal keys the row with the
     lowest `order` (first file, first row) stays kept, the others become `duplicate`.
No worker ever holds every hash: each holds the keys of its own partitions.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from chuxin_ray.data.cleaning import normalize_for_dedup

KEY = "dedup_key"  # high 64 bits: the shuffle key
KEY_LOW = "dedup_key_low"  # low 64 bits
DUPLICATE = "duplicate"


def text_hashes(texts: pa.Array, mode: str) -> np.ndarray:
    """(n, 2) int64: blake2b-128 of each normalised text."""
    normalised = normalize_for_dedup(texts, mode).to_pylist()
    digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in normalised)
    return np.frombuffer(digests, dtype="<i8").reshape(-1, 2)  # (n, 2)


def add_dedup_key(table: pa.Table, mode: str) -> pa.Table:
    """Kept rows: the text hash. Other rows: (order, -1), unique, so they spread evenly over
    partitions and never group with anything (mark_duplicates skips them anyway)."""
    outcome = np.asarray(table.column("outcome").to_pylist(), dtype=object)
    keys = np.stack([table.column("order").to_numpy(), np.full(table.num_rows, -1)], axis=1)  # (n, 2)
    kept = np.flatnonzero(outcome == "kept")  # (K,)
    if len(kept):
        keys[kept] = text_hashes(table.column("text").take(pa.array(kept)).combine_chunks(), mode)
    return table.append_column(KEY, pa.array(keys[:, 0], pa.int64())).append_column(
        KEY_LOW, pa.array(keys[:, 1], pa.int64())
    )


def mark_duplicates(table: pa.Table) -> pa.Table:
    """Within one hash partition: all kept rows but the first of each key become duplicates."""
    outcome = np.asarray(table.column("outcome").to_pylist(), dtype=object)
    kept = np.flatnonzero(outcome == "kept")  # (K,)
    if len(kept) > 1:
        high = table.column(KEY).to_numpy()[kept]  # (K,)
        low = table.column(KEY_LOW).to_numpy()[kept]  # (K,)
        order = table.column("order").to_numpy()[kept]  # (K,)
        by_key = np.lexsort((order, low, high))  # (K,) by key, then by order
        high, low, ranked = high[by_key], low[by_key], kept[by_key]
        repeat = np.concatenate([[False], (high[1:] == high[:-1]) & (low[1:] == low[:-1])])  # (K,)
        outcome[ranked[repeat]] = DUPLICATE
        reason = np.asarray(table.column("reason").to_pylist(), dtype=object)
        reason[ranked[repeat]] = DUPLICATE
        table = table.set_column(
            table.schema.get_field_index("reason"), "reason", pa.array(reason, pa.string())
        )
    table = table.set_column(
        table.schema.get_field_index("outcome"), "outcome", pa.array(outcome, pa.string())
    )
    return table.drop_columns([KEY, KEY_LOW])
