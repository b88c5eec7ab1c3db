"""Row-range shards (the resumable unit of synthesize and the embedding unit of mine): planned the same
way every time, never spanning files, and read back exactly, across Parquet row groups."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from chuxin_ray import storage
from chuxin_ray.config import ConfigError
from chuxin_ray.data.row_ranges import InputFile, plan_ranges, read_range, stage_inputs


def test_plan_is_deterministic_and_never_spans_files():
    files = [InputFile("a", 25), InputFile("b", 0), InputFile("c", 7)]
    ranges = plan_ranges(files, 10)
    assert [(r.name, r.path, r.start, r.stop, r.offset) for r in ranges] == [
        ("shard-00000", "a", 0, 10, 0),
        ("shard-00001", "a", 10, 20, 0),
        ("shard-00002", "a", 20, 25, 0),
        ("shard-00003", "c", 0, 7, 25),
    ]
    assert ranges == plan_ranges(files, 10)


@pytest.mark.parametrize("row_group_size", [4, 7, 100])
def test_read_range_returns_exactly_the_rows(tmp_path, row_group_size):
    path = tmp_path / "t.parquet"
    pq.write_table(
        pa.table({"id": [f"d{i}" for i in range(30)], "x": list(range(30))}),
        path,
        row_group_size=row_group_size,
    )
    fs = pafs.LocalFileSystem()
    for r in plan_ranges([InputFile(str(path), 30)], 9):
        table = read_range(fs, r, ["x"])
        assert table.column_names == ["x"] and table.column("x").to_pylist() == list(range(r.start, r.stop))
    assert read_range(fs, plan_ranges([InputFile(str(path), 30)], 30)[0]).num_rows == 30


def test_stage_inputs_from_a_manifest_or_a_plain_folder(tmp_path):
    out = storage.resolve(str(tmp_path / "stage"))
    pq.write_table(pa.table({"id": ["a", "b", "c"]}), tmp_path / "plain.parquet")
    plain = stage_inputs(storage.resolve(str(tmp_path)), "x.input")
    assert [(f.path.rsplit("/", 1)[-1], f.rows) for f in plain] == [("plain.parquet", 3)]
    with pytest.raises(ConfigError, match="x.input: no Parquet files"):
        stage_inputs(out, "x.input")
    storage.write_json(out.child("_manifest.json"), {"status": "running"})
    with pytest.raises(ConfigError, match="incomplete stage output"):
        stage_inputs(out, "x.input")
    storage.write_manifest(
        out, {"status": "complete", "files": {"data": [{"path": "data/p.parquet", "rows": 5}]}}
    )
    assert stage_inputs(out, "x.input") == [InputFile(out.child("data/p.parquet").path, 5)]
