"""Exact deduplication across the whole corpus by a hash of the normalised text.

Two steps around a hash shuffle (see stages/ingest.py):
  1. `add_dedup_key`: a 64-bit hash of each kept row's normalised text.
  2. After `repartition(keys=["dedup_key"])` every copy of a text sits in the same partition, so
     `mark_duplicates` on a whole partition is global: of each group of equal keys the row with the
     lowest `order` (first file, first row) stays kept, the others become `duplicate`.
No worker ever holds every hash: each holds the keys of its own partitions.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from chuxin_ray.data.cleaning import normalize_for_dedup

KEY = "dedup_key"
DUPLICATE = "duplicate"


def text_hash(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True
    )


def add_dedup_key(table: pa.Table, mode: str) -> pa.Table:
    """Kept rows: hash of the normalised text. Other rows: their own `order`, unique, so they
    spread evenly over partitions and never group with anything (mark_duplicates skips them)."""
    outcome = table.column("outcome").to_pylist()
    texts = table.column("text").to_pylist()
    order = table.column("order").to_pylist()
    keys = [
        text_hash(normalize_for_dedup(t, mode)) if o == "kept" else order[i]
        for i, (o, t) in enumerate(zip(outcome, texts, strict=True))
    ]
    return table.append_column(KEY, pa.array(keys, pa.int64()))


def mark_duplicates(table: pa.Table) -> pa.Table:
    """Within one hash partition: all kept rows but the first of each key become duplicates."""
    outcome = np.asarray(table.column("outcome").to_pylist(), dtype=object)
    kept = np.flatnonzero(outcome == "kept")  # (K,)
    if len(kept) > 1:
        keys = table.column(KEY).to_numpy()[kept]  # (K,)
        order = table.column("order").to_numpy()[kept]  # (K,)
        by_key = np.lexsort((order, keys))  # (K,) by key, then by order
        ranked, sorted_keys = kept[by_key], keys[by_key]  # (K,), (K,)
        repeat = np.concatenate([[False], sorted_keys[1:] == sorted_keys[:-1]])  # (K,) not first of its key
        outcome[ranked[repeat]] = DUPLICATE
        reason = np.asarray(table.column("reason").to_pylist(), dtype=object)
        reason[ranked[repeat]] = DUPLICATE
        table = table.set_column(
            table.schema.get_field_index("reason"), "reason", pa.array(reason, pa.string())
        )
    table = table.set_column(
        table.schema.get_field_index("outcome"), "outcome", pa.array(outcome, pa.string())
    )
    return table.drop_columns([KEY])
