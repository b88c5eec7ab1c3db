"""Deterministic row-range shards over a stage's Parquet output.

A stage output lists its files with row counts in its manifest, in a fixed order; cutting that
sequence into ranges of `shard_rows` rows gives shards that are the same on every run. A stage that
names its output after the shard (`shard-00007`) can then skip the shards a killed run finished, and
global row numbers (the position in the sequence) order a corpus the same way on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from chuxin_ray import storage
from chuxin_ray.config import ConfigError


@dataclass(frozen=True)
class InputFile:
    path: str  # what the filesystem understands
    rows: int


@dataclass(frozen=True)
class RowRange:
    """Rows [start, stop) of one file; `offset` is the global row number of the file's row 0."""

    shard: int
    path: str
    start: int
    stop: int
    offset: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"shard-{self.shard:05d}"


def listed_files(
    src: storage.Location, key: str, folder: str = "data", what: str = "Parquet files", producer: str = ""
) -> tuple[list[str], list[int] | None]:
    """Filesystem paths of a complete stage output's `folder` files, with the row counts its manifest
    lists; or every Parquet file below a plain folder, with no counts (None). `key` names the config key
    in errors, `what` the files and `producer` the stage that writes them."""
    manifest = storage.read_manifest(src)
    if manifest is not None:
        entries = manifest["files"][folder]
        return [src.child(f["path"]).path for f in entries], [int(f["rows"]) for f in entries]
    if storage.exists(src.child(storage.MANIFEST)):
        raise ConfigError(f"{key}: {src.uri} is an incomplete stage output; rerun the stage that writes it")
    try:
        files = storage.list_files(src, (".parquet",))
    except storage.StorageError:
        files = []
    if not files:
        run = f"run {producer} first" if producer else "run the stage before"
        raise ConfigError(f"{key}: no {what} at {src.uri}; {run} or set {key}")
    return [f.path for f in files], None


def stage_inputs(src: storage.Location, key: str, folder: str = "data") -> list[InputFile]:
    """The files with row counts of a complete stage output, or every Parquet file below a plain
    folder (row counts from the footers). `key` names the config key in errors."""
    paths, rows = listed_files(src, key, folder)
    if rows is None:
        rows = []
        for path in paths:
            with src.fs.open_input_file(path) as f:
                rows.append(pq.ParquetFile(f).metadata.num_rows)
    return [InputFile(path, n) for path, n in zip(paths, rows, strict=True)]


def plan_ranges(files: list[InputFile], shard_rows: int) -> list[RowRange]:
    """Each file cut into ranges of at most `shard_rows` rows; a range never spans two files, so
    reading one touches one file."""
    ranges, offset = [], 0
    for f in files:
        for start in range(0, f.rows, shard_rows):
            ranges.append(RowRange(len(ranges), f.path, start, min(start + shard_rows, f.rows), offset))
        offset += f.rows
    return ranges


def read_range(fs: pafs.FileSystem, r: RowRange, columns: list[str] | None = None) -> pa.Table:
    """The rows of one range (all columns when `columns` is None): only the row groups that overlap
    it are decoded."""
    with fs.open_input_file(r.path) as f:
        pf = pq.ParquetFile(f)
        groups, first_row, at = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if at < r.stop and at + n > r.start:
                groups.append(g)
                first_row = at if first_row is None else first_row
            at += n
        if not groups:
            empty = pf.schema_arrow.empty_table()
            return empty if columns is None else empty.select(columns)
        table = pf.read_row_groups(groups, columns=columns)
    return table.slice(r.start - first_row, r.rows)
