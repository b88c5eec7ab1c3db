"""The ingest stage's last step: shards rewritten without their displaced copies, retry-safe."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chuxin_ray import storage
from chuxin_ray.config import StorageConfig
from chuxin_ray.data.dedup import text_hashes
from chuxin_ray.data.shards import write_shard
from chuxin_ray.stages.ingest import rewrite_shard, shard_id, shard_name, summarize

MODE = "nfkc_lower_nospace"


def data_files(root) -> dict[str, list[str]]:
    return {
        p.name: pq.read_table(p).column("text").to_pylist() for p in sorted((root / "data").glob("*.parquet"))
    }


def keys_of(*texts: str) -> set[tuple[int, int]]:
    return set(map(tuple, text_hashes(pa.array(texts), MODE).tolist()))


def test_shards_lose_exactly_their_displaced_copies_and_a_retry_changes_nothing(tmp_path):
    out = storage.resolve(str(tmp_path), StorageConfig())
    a, b, c = shard_id(0, 0), shard_id(0, 1), shard_id(3, 0)
    for shard, texts in ((a, ["一", "二", "Ｔhree"]), (b, ["四", "五"]), (c, ["六"])):
        write_shard(out, "data", pa.table({"text": texts}), name=shard_name(shard))
    # keys of normalised texts: "three" is the key of "Ｔhree"; c's copy was not written (a retried read)
    gone = {a: keys_of("一", "three"), b: keys_of("四", "五"), c: keys_of("七")}

    def rewrite_all():
        return {s: rewrite_shard(out, s, keys, MODE) for s, keys in gone.items()}

    first = rewrite_all()
    state = data_files(tmp_path)
    assert state == {"part-000000-000000-dedup.parquet": ["二"], "part-000003-000000.parquet": ["六"]}
    assert first == {
        a: ("data/part-000000-000000-dedup.parquet", 1),
        b: ("", 0),
        c: ("data/part-000003-000000.parquet", 1),  # nothing to drop: left as it is
    }
    assert rewrite_all() == first and data_files(tmp_path) == state  # a retried task


def test_summary_accounts_for_every_row_or_refuses():
    a = shard_id(0, 0)
    result = {
        "read": 7,
        "outcomes": [
            ["kept", "", 4],
            ["duplicate", "", 1],
            ["dropped", "too_short", 1],
            ["quarantined", "invalid_json", 1],
        ],
        "files": [
            ["data", "data/x", 4, a],
            ["dropped", "dropped/x", 1, a],
            ["quarantine", "quarantine/x", 1, a],
        ],
    }
    rewrite = {"shard": a, "path": "data/y", "rows": 3, "displaced": 1}
    counts, files = summarize([result], [rewrite])
    assert counts == {
        "read": 7,
        "kept": 3,
        "dropped": {"too_short": 1},
        "duplicates": 2,  # one found by its claim, one displaced after it was written
        "quarantined": {"invalid_json": 1},
    }
    assert files["data"] == [{"path": "data/y", "rows": 3}]
    with pytest.raises(RuntimeError, match="had 1 displaced copies to drop"):
        summarize([result], [{**rewrite, "rows": 2}])  # a rewrite lost a row it was not asked to drop
    with pytest.raises(RuntimeError, match="7 records read but 6 accounted for"):
        summarize([{**result, "outcomes": [o for o in result["outcomes"] if o[0] != "duplicate"]}], [])
