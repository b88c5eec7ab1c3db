"""Read raw corpus files into normalised records, one row per source record, bad ones included.

Every source record becomes exactly one row of RECORD_SCHEMA: `outcome` is "kept" for a good record
(id, text, source filled) and "quarantined" for a bad one (`reason` says why, `raw` holds the
original bytes). Nothing is dropped here, so the ingest stage can prove rows read = rows accounted.

Formats: jsonl (plain, .gz, .zst) read as a byte stream line by line, and parquet read row group by
row group; neither is ever held whole in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from chuxin_ray.data.cleaning import SPACE_CODE_POINTS, SPACE_RE2, string_bytes

# One row per source record; outcome in {kept, quarantined, dropped, duplicate}.
RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),  # URI of the source file
        ("row", pa.int64()),  # 1-based line (jsonl) or 0-based row (parquet)
        ("order", pa.int64()),  # file_index * 2**32 + row: a global, deterministic record order
        ("outcome", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.binary()),  # the original record, for quarantined rows only
    ]
)

# Why a record is quarantined (bad input) rather than kept.
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_TEXT = "empty_text"
UNREADABLE_FILE = "unreadable_file"

COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class SourceFile:
    """One input file and how to read it; picklable, so it travels to Ray Data tasks."""

    fs: pafs.FileSystem
    path: str  # filesystem path
    uri: str  # printable URI
    format: str  # "jsonl" | "parquet"
    source: str
    text_field: str
    id_field: str | None
    index: int  # position in the sorted list of all input files
    size: int


def detect_format(path: str) -> str | None:
    name = path.lower()
    for suffix in COMPRESSION:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def source_name(uri: str) -> str:
    """`s3://b/corpora/news.jsonl.gz` -> `news`; a prefix `s3://b/corpora/news/` -> `news`."""
    base = posixpath.basename(uri.rstrip("/"))
    for suffix in (*COMPRESSION, *JSONL_SUFFIXES, *PARQUET_SUFFIXES):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
    return base or "corpus"


def record_id(source: str, text: str) -> str:
    """A stable id from the content: the same text in the same source always gets the same id."""
    return f"{source}-{hashlib.blake2b(text.encode('utf-8'), digest_size=8).hexdigest()}"


class RecordBuilder:
    """Collects rows of RECORD_SCHEMA column by column and hands them out as tables."""

    def __init__(self, file: SourceFile):
        self.file = file
        self.cols: dict[str, list[Any]] = {name: [] for name in RECORD_SCHEMA.names}

    def kept(self, row: int, id_: str, text: str) -> None:
        self._add(row, id_, text, "kept", "", None)

    def quarantined(self, row: int, reason: str, raw: bytes) -> None:
        self._add(row, None, None, "quarantined", reason, raw)

    def _add(self, row: int, id_, text, outcome: str, reason: str, raw) -> None:
        c = self.cols
        c["id"].append(id_)
        c["text"].append(text)
        c["source"].append(self.file.source)
        c["path"].append(self.file.uri)
        c["row"].append(row)
        c["order"].append((self.file.index << 32) + row)
        c["outcome"].append(outcome)
        c["reason"].append(reason)
        c["raw"].append(raw)

    def flush(self) -> pa.Table:
        table = pa.table(self.cols, schema=RECORD_SCHEMA)
        self.cols = {name: [] for name in RECORD_SCHEMA.names}
        return table


READ_ERRORS = (OSError, pa.ArrowException, EOFError, ValueError)


def read_records(file: SourceFile, batch_rows: int = 8192, fast: bool = True) -> Iterator[pa.Table]:
    """Stream one file as tables of RECORD_SCHEMA. Never raises for bad content: a file that
    cannot be read (corrupt compression, not parquet) ends with one `unreadable_file` row after
    the rows read before the failure. `fast=False` parses jsonl line by line (the plain path)."""
    if file.format == "jsonl":
        yield from _read_jsonl(file, batch_rows, fast)
    else:
        yield from _read_parquet(file, batch_rows)


def _unreadable(file: SourceFile, row: int, error: Exception) -> pa.Table:
    out = RecordBuilder(file)
    out.quarantined(row, UNREADABLE_FILE, f"{type(error).__name__}: {error}"[:500].encode("utf-8"))
    return out.flush()


# --------------------------------------------------------------------------------------------------
# jsonl
# --------------------------------------------------------------------------------------------------


def _read_jsonl(file: SourceFile, batch_rows: int, fast: bool) -> Iterator[pa.Table]:
    if fast:
        yield from _read_jsonl_fast(file, batch_rows)
        return
    compression = COMPRESSION.get(posixpath.splitext(file.path)[1].lower())
    block: list[tuple[int, bytes]] = []  # (line number, line) of non-blank lines
    lineno, error = 0, None
    try:
        # 8 MiB reads: one ranged GET each on object stores, not one per decompressed chunk
        with file.fs.open_input_stream(file.path, compression=compression, buffer_size=1 << 23) as stream:
            for lineno, line in _iter_lines(stream):
                if line.strip():  # blank lines separate nothing and are not records
                    block.append((lineno, line))
                if len(block) >= batch_rows:
                    yield parse_jsonl_block(block, file, fast)
                    block = []
    except READ_ERRORS as e:
        error = e
    if block:
        yield parse_jsonl_block(block, file, fast)
    if error is not None:
        yield _unreadable(file, lineno + 1, error)


def _iter_lines(stream, chunk_bytes: int = 1 << 22) -> Iterator[tuple[int, bytes]]:
    lineno = 0
    pending = b""
    while chunk := stream.read(chunk_bytes):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            lineno += 1
            yield lineno, line.rstrip(b"\r")
    if pending:
        yield lineno + 1, pending.rstrip(b"\r")


# What bytes.strip() strips: a line of only these is blank.
_BLANK_BYTE = np.zeros(256, dtype=bool)
_BLANK_BYTE[list(b" \t\n\r\x0b\x0c")] = True


@dataclass
class _Lines:
    """Some consecutive-in-file lines of one decompressed read: line i is data[starts[i]:ends[i]]
    (no "\\n"; a "\\r" before it stays) and is line number rows[i] of the file."""

    data: bytes
    starts: np.ndarray  # (k,) int64
    ends: np.ndarray  # (k,) int64
    rows: np.ndarray  # (k,) int64, 1-based

    def __getitem__(self, which) -> _Lines:
        return _Lines(self.data, self.starts[which], self.ends[which], self.rows[which])

    def __len__(self) -> int:
        return len(self.rows)


def _read_jsonl_fast(file: SourceFile, batch_rows: int) -> Iterator[pa.Table]:
    """The same blocks, rows and errors as the plain path (`_iter_lines` + `parse_jsonl_block`),
    with lines found by numpy in the decompressed bytes and not split into Python objects."""
    compression = COMPRESSION.get(posixpath.splitext(file.path)[1].lower())
    block: list[_Lines] = []  # the current block's non-blank lines, in pieces
    size, lineno, error = 0, 0, None  # lines in block; lines read so far
    try:
        with file.fs.open_input_stream(file.path, compression=compression, buffer_size=1 << 23) as stream:
            for lines in _iter_line_ranges(stream):
                lineno = int(lines.rows[-1])
                lines = lines[~_blank(lines)]
                while len(lines):  # cut blocks of batch_rows non-blank lines
                    piece, lines = lines[: batch_rows - size], lines[batch_rows - size :]
                    block.append(piece)
                    size += len(piece)
                    if size == batch_rows:
                        yield _parse_lines(block, file)
                        block, size = [], 0
    except READ_ERRORS as e:
        error = e
    if block:
        yield _parse_lines(block, file)
    if error is not None:
        yield _unreadable(file, lineno + 1, error)


def _iter_line_ranges(stream, chunk_bytes: int = 1 << 22) -> Iterator[_Lines]:
    """The lines `_iter_lines` yields, read by read: each complete line of a read as soon as it
    is read, and a last line with no "\\n" at the end."""
    lineno = 0
    pending = b""
    while chunk := stream.read(chunk_bytes):
        data = pending + chunk
        ends = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))  # (k,) where each line ends
        if not len(ends):
            pending = data
            continue
        starts = np.concatenate([[0], ends[:-1] + 1])  # (k,)
        yield _Lines(data, starts, ends, np.arange(lineno + 1, lineno + 1 + len(ends)))
        lineno += len(ends)
        pending = data[ends[-1] + 1 :]
    if pending:
        yield _Lines(pending, np.array([0]), np.array([len(pending)]), np.array([lineno + 1]))


def _blank(lines: _Lines) -> np.ndarray:
    """(k,) bool: which lines are blank (`not line.strip()`). Only a line whose first byte is
    whitespace can be (an empty line's first byte is its "\\n"), so only those are looked at."""
    first = np.frombuffer(lines.data, np.uint8)[lines.starts]  # (k,) every start is < len(data)
    blank = _BLANK_BYTE[first]  # (k,) maybe blank
    for i in np.flatnonzero(blank):
        blank[i] = not lines.data[lines.starts[i] : lines.ends[i]].strip()
    return blank


def _parse_lines(block: list[_Lines], file: SourceFile) -> pa.Table:
    """`parse_jsonl_block` of the block's lines. When they are consecutive in the file (no blank
    line between), their bytes go to pyarrow as they are; anything pyarrow does not read as good
    records goes line by line, as on the plain path."""
    rows = np.concatenate([piece.rows for piece in block])  # (n,)
    if rows[-1] - rows[0] == len(rows) - 1:  # consecutive, so each piece is one byte range
        data = b"\n".join(memoryview(p.data)[p.starts[0] : p.ends[-1]] for p in block)
        if (table := _parse_block_fast(data, rows, file)) is not None:
            return table
        fast = False  # already failed on these bytes
    else:
        fast = True  # blank lines inside: the joined lines may still parse
    lines = [
        (row, piece.data[start:end].rstrip(b"\r"))
        for piece in block
        for row, start, end in zip(
            piece.rows.tolist(), piece.starts.tolist(), piece.ends.tolist(), strict=True
        )
    ]
    return parse_jsonl_block(lines, file, fast)


def parse_jsonl_block(block: list[tuple[int, bytes]], file: SourceFile, fast: bool = True) -> pa.Table:
    """Records of a block of lines: pyarrow's C++ JSON parser when every line is a good record,
    else (or with fast=False) line by line in Python, which names what is wrong with each."""
    if fast:
        data = b"\n".join(line for _, line in block)
        table = _parse_block_fast(data, np.array([n for n, _ in block], dtype=np.int64), file)
        if table is not None:
            return table
    out = RecordBuilder(file)
    for lineno, line in block:
        parse_jsonl_line(line, lineno, file, out)
    return out.flush()


def _parse_block_fast(data: bytes, rows: np.ndarray, file: SourceFile) -> pa.Table | None:
    """The records of `data`, lines of JSON numbered `rows` (n,); None whenever they hold anything
    but good records, so the plain path decides."""
    try:
        parsed = pajson.read_json(
            io.BytesIO(data),
            read_options=pajson.ReadOptions(use_threads=False, block_size=len(data) + 1),
            parse_options=pajson.ParseOptions(explicit_schema=pa.schema([(file.text_field, pa.string())])),
        )
        if parsed.num_rows != len(rows):  # e.g. two objects on one line
            return None
        text = parsed.column(file.text_field).combine_chunks()
        text.validate(full=True)  # pyarrow does not check UTF-8 inside strings
        ids = parsed.column(file.id_field).combine_chunks() if file.id_field else None
    except (pa.ArrowException, KeyError):
        return None
    if text.null_count or _any_blank(text):
        return None
    if ids is not None:
        # str and int ids only, as on the plain path (str(1) == "1"); floats and bools are wrong types
        if ids.null_count or not (pa.types.is_string(ids.type) or pa.types.is_int64(ids.type)):
            return None
        ids = ids.cast(pa.string())
    else:
        ids = pa.array([record_id(file.source, t) for t in text.to_pylist()], pa.string())
    return _kept_table(file, rows, ids, text)


# First UTF-8 bytes of the characters str.isspace() accepts: only a text starting with one can be blank.
_SPACE_LEAD_BYTE = np.zeros(256, dtype=bool)
_SPACE_LEAD_BYTE[[chr(c).encode("utf-8")[0] for c in SPACE_CODE_POINTS]] = True


def _any_blank(text: pa.Array) -> bool:
    """Whether any text is empty or only whitespace (`not text.strip()`), by RE2 on the few texts
    that start with a whitespace character's first byte."""
    offsets, data = string_bytes(text)  # (n + 1,)
    starts, ends = offsets[:-1], offsets[1:]  # (n,)
    if (starts == ends).any():
        return True
    maybe = np.flatnonzero(_SPACE_LEAD_BYTE[np.frombuffer(data, np.uint8)[starts]])  # (m,)
    if not len(maybe):
        return False
    some = text.take(pa.array(maybe))
    return pc.any(pc.equal(pc.count_substring_regex(some, SPACE_RE2), pc.utf8_length(some))).as_py()


def _kept_table(file: SourceFile, rows: np.ndarray, ids: pa.Array, text: pa.Array) -> pa.Table:
    n = len(rows)
    return pa.table(
        {
            "id": ids,
            "text": text,
            "source": pa.array([file.source] * n, pa.string()),
            "path": pa.array([file.uri] * n, pa.string()),
            "row": rows,
            "order": (file.index << 32) + rows,
            "outcome": pa.array(["kept"] * n, pa.string()),
            "reason": pa.array([""] * n, pa.string()),
            "raw": pa.nulls(n, pa.binary()),
        },
        schema=RECORD_SCHEMA,
    )


def parse_jsonl_line(line: bytes, lineno: int, file: SourceFile, out: RecordBuilder) -> None:
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return out.quarantined(lineno, INVALID_UTF8, line)
    try:
        obj = json.loads(decoded)
    except ValueError:
        return out.quarantined(lineno, INVALID_JSON, line)
    if not isinstance(obj, dict):
        return out.quarantined(lineno, NOT_AN_OBJECT, line)
    outcome = check_fields(obj.get(file.text_field), obj.get(file.id_field) if file.id_field else None, file)
    if isinstance(outcome, str):
        return out.quarantined(lineno, outcome, line)
    out.kept(lineno, *outcome)


def check_fields(text: Any, id_: Any, file: SourceFile) -> str | tuple[str, str]:
    """(id, text) for a usable record, else the quarantine reason."""
    if text is None or (file.id_field and id_ is None):
        return MISSING_FIELD
    if not isinstance(text, str) or (
        file.id_field and (isinstance(id_, bool) or not isinstance(id_, str | int))
    ):
        return WRONG_TYPE
    if not text.strip():
        return EMPTY_TEXT
    try:
        text.encode("utf-8")  # JSON "\ud800" escapes decode to lone surrogates, which UTF-8 cannot hold
    except UnicodeEncodeError:
        return INVALID_UTF8
    return (str(id_) if file.id_field else record_id(file.source, text)), text


# --------------------------------------------------------------------------------------------------
# parquet
# --------------------------------------------------------------------------------------------------


def _read_parquet(file: SourceFile, batch_rows: int) -> Iterator[pa.Table]:
    row, error = 0, None  # rows are 0-based: the row index in the file
    try:
        with file.fs.open_input_file(file.path) as handle:
            pf = pq.ParquetFile(handle)
            present = [c for c in (file.text_field, file.id_field) if c and c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=batch_rows, columns=present):
                yield parquet_batch(batch, row, file, present)
                row += batch.num_rows
    except READ_ERRORS as e:
        error = e
    if error is not None:
        yield _unreadable(file, row, error)


def parquet_batch(batch: pa.RecordBatch, first_row: int, file: SourceFile, present: list[str]) -> pa.Table:
    out = RecordBuilder(file)
    columns = {c: batch.column(c).to_pylist() for c in present}
    for i in range(batch.num_rows):
        values = {c: columns[c][i] for c in present}
        outcome = check_fields(
            values.get(file.text_field), values.get(file.id_field) if file.id_field else None, file
        )
        if isinstance(outcome, str):
            raw = json.dumps(values, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
            out.quarantined(first_row + i, outcome, raw)
        else:
            out.kept(first_row + i, *outcome)
    return out.flush()
