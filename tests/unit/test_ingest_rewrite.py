"""The ingest stage's last step: data shards rewritten without their duplicates, retry-safe."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chuxin_ray import storage
from chuxin_ray.config import StorageConfig
from chuxin_ray.data.dedup import ROW_SCHEMA
from chuxin_ray.data.shards import write_shard
from chuxin_ray.stages.ingest import drop_duplicates, shard_id, shard_name, summarize


def data_files(root) -> dict[str, list[str]]:
    return {
        p.name: pq.read_table(p).column("text").to_pylist() for p in sorted((root / "data").glob("*.parquet"))
    }


def test_shards_lose_exactly_their_duplicates_and_a_retry_changes_nothing(tmp_path):
    out = storage.resolve(str(tmp_path), StorageConfig())
    a, b, c = shard_id(0, 0), shard_id(0, 1), shard_id(3, 0)
    for shard, texts in ((a, ["一", "二", "三"]), (b, ["四", "五"]), (c, ["六"])):
        write_shard(out, "data", pa.table({"text": texts}), name=shard_name(shard))
    duplicates = pa.table([[b, a, b, a], [0, 2, 1, 0]], schema=ROW_SCHEMA)  # shard b loses every row

    first = drop_duplicates(duplicates, out).to_pylist()
    state = data_files(tmp_path)
    assert state == {"part-000000-000000-dedup.parquet": ["二"], "part-000003-000000.parquet": ["六"]}
    assert sorted((r["shard"], r["rows"], r["duplicates"]) for r in first) == [(a, 1, 2), (b, 0, 2)]
    assert {r["shard"]: r["path"] for r in first} == {a: "data/part-000000-000000-dedup.parquet", b: ""}

    again = drop_duplicates(duplicates, out).to_pylist()  # a retried task
    assert data_files(tmp_path) == state and sorted(again, key=str) == sorted(first, key=str)

    assert drop_duplicates(ROW_SCHEMA.empty_table(), out).num_rows == 0  # a group without duplicates
    assert data_files(tmp_path) == state


def test_summary_accounts_for_every_row_or_refuses():
    a = shard_id(0, 0)
    result = {
        "read": 6,
        "outcomes": [["kept", "", 4], ["dropped", "too_short", 1], ["quarantined", "invalid_json", 1]],
        "files": [
            ["data", "data/x", 4, a],
            ["dropped", "dropped/x", 1, a],
            ["quarantine", "quarantine/x", 1, a],
        ],
    }
    rewrite = {"shard": a, "path": "data/y", "rows": 3, "duplicates": 1}
    counts, files = summarize([result], [rewrite])
    assert counts == {
        "read": 6,
        "kept": 3,
        "dropped": {"too_short": 1},
        "duplicates": 1,
        "quarantined": {"invalid_json": 1},
    }
    assert files["data"] == [{"path": "data/y", "rows": 3}]
    with pytest.raises(RuntimeError, match="6 records read but 5 accounted for"):
        summarize([result], [{**rewrite, "rows": 2}])  # a rewrite lost a row it was not asked to drop
