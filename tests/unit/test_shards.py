"""Parquet shards: every stage writes through data.shards (zstd at ZSTD_LEVEL, atomically)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from chuxin_ray import demo, storage
from chuxin_ray.data.shards import read_table, write_parquet, write_shard


def test_shards_round_trip_as_zstd_smaller_than_pyarrows_default_level(tmp_path):
    texts = demo.people_daily()[:3000]
    table = pa.table({"id": [f"pd-{i}" for i in range(len(texts))], "text": texts})
    out = storage.resolve(str(tmp_path))
    rel = write_shard(out, "data", table, name="part-000001")
    assert rel == "data/part-000001.parquet"
    assert read_table(out, [rel]).equals(table)
    meta = pq.ParquetFile(tmp_path / rel).metadata
    assert {meta.row_group(0).column(i).compression for i in range(2)} == {"ZSTD"}

    write_parquet(out.child("ours.parquet"), table)
    pq.write_table(table, tmp_path / "default.parquet", compression="zstd")  # pyarrow's level (1)
    ours, default = (tmp_path / "ours.parquet").stat().st_size, (tmp_path / "default.parquet").stat().st_size
    assert ours < 0.9 * default, (ours, default)
