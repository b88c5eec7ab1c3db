"""Parquet shards: the unit every stage writes and the next stage reads."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from chuxin_ray.storage import Location, write_bytes


def write_shard(out: Location, folder: str, table: pa.Table, name: str | None = None) -> str:
    """Write `table` as one Parquet file `out/folder/<name>.parquet`, atomically; returns its path
    relative to `out` (what manifests list). Without a name the name is random, so concurrent writers
    and retried tasks never overwrite each other; a writer that names its shards must give the same
    name only to the same rows (a retried task rewriting what it wrote). The stage's manifest decides
    which files count."""
    rel = f"{folder}/{name or 'part-' + uuid.uuid4().hex[:16]}.parquet"
    sink = pa.BufferOutputStream()
    # 64k-row groups: readers (Ray Data, the next stage) can split a shard into parallel blocks
    pq.write_table(table, sink, compression="zstd", row_group_size=65_536)
    write_bytes(out.child(rel), sink.getvalue())
    return rel


def read_table(out: Location, rel_paths: list[str]) -> pa.Table:
    """Read listed shards of a stage output into one table: for small outputs and tests."""
    tables = []
    for rel in rel_paths:
        with out.fs.open_input_file(out.child(rel).path) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)
