"""Read and write retrieval sets in the BEIR / C-MTEB layout.

    corpus   _id, title, text          (title optional, "" when absent)
    queries  _id, text
    qrels    query-id, corpus-id, score   (score: an integer grade)

Each table is jsonl (one object per line), tsv (a header line naming the columns, as BEIR ships its
qrels/*.tsv; fields quoted the csv way when they hold a tab, newline or quote) or parquet; jsonl and tsv
may be .gz or .zst. C-MTEB's own column names are accepted too: `id` for `_id`, `qid`/`pid` for
`query-id`/`corpus-id`. Ids are read as strings (an integer id 7 becomes "7", as BEIR does).

Malformed input raises RetrievalDataError, whose message starts with the file and the place:
`path:LINE:` for jsonl and tsv (1-based physical lines, the tsv header being line 1) and
`path: row N:` for parquet (0-based, as `chuxin_ray.data.records` counts parquet rows).

Files are opened through a pyarrow filesystem (local by default), so a `chuxin_ray.storage.Location`'s
`fs` and `path` read object storage the same way.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class RetrievalDataError(ValueError):
    """Malformed retrieval input; the message names the file and the line or row."""


class CorpusDoc(NamedTuple):
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class RetrievalSet:
    corpus: dict[str, dict[str, str]]  # doc id -> {"title", "text"}, BEIR's GenericDataLoader shape
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: grade}


@dataclass(frozen=True)
class _Field:
    name: str  # canonical (BEIR) name, used when writing
    aliases: tuple[str, ...]  # accepted column names, canonical first
    kind: str  # "id" | "text" | "grade"
    required: bool = True


CORPUS_FIELDS = (
    _Field("_id", ("_id", "id"), "id"),
    _Field("title", ("title",), "text", required=False),
    _Field("text", ("text",), "text"),
)
QUERY_FIELDS = (_Field("_id", ("_id", "id"), "id"), _Field("text", ("text",), "text"))
QRELS_FIELDS = (
    _Field("query-id", ("query-id", "qid"), "id"),
    _Field("corpus-id", ("corpus-id", "pid"), "id"),
    _Field("score", ("score",), "grade"),
)


def detect_format(path: str | os.PathLike) -> tuple[str, str | None]:
    """(format, compression) from the file name: `qrels/test.tsv.gz` -> ("tsv", "gzip")."""
    name = os.fspath(path).lower()
    stem, suffix = posixpath.splitext(name)
    compression = COMPRESSION.get(suffix)
    if compression:
        stem, suffix = posixpath.splitext(stem)
    if suffix not in FORMATS:
        raise RetrievalDataError(
            f"{os.fspath(path)}: unknown format; name it .jsonl, .tsv or .parquet (jsonl/tsv may add .gz or .zst)"
        )
    if compression and FORMATS[suffix] == "parquet":
        raise RetrievalDataError(
            f"{os.fspath(path)}: parquet compresses internally; drop the {suffix} suffix"
        )
    return FORMATS[suffix], compression


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


def iter_corpus(path: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> Iterator[CorpusDoc]:
    """Stream the corpus one document at a time, in file order; nothing is held beyond a parquet batch."""
    for _, row in _iter_rows(path, CORPUS_FIELDS, filesystem):
        yield CorpusDoc(row["_id"], row["title"], row["text"])


def read_corpus(
    path: str | os.PathLike, filesystem: pafs.FileSystem | None = None
) -> dict[str, dict[str, str]]:
    """doc id -> {"title", "text"}. A repeated id with different content is an error."""
    corpus: dict[str, dict[str, str]] = {}
    for where, row in _iter_rows(path, CORPUS_FIELDS, filesystem):
        doc = {"title": row["title"], "text": row["text"]}
        if corpus.setdefault(row["_id"], doc) != doc:
            raise RetrievalDataError(f"{where}: document id {row['_id']!r} repeated with different content")
    return corpus


def read_queries(path: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> dict[str, str]:
    """query id -> text. A repeated id with a different text is an error."""
    queries: dict[str, str] = {}
    for where, row in _iter_rows(path, QUERY_FIELDS, filesystem):
        if queries.setdefault(row["_id"], row["text"]) != row["text"]:
            raise RetrievalDataError(f"{where}: query id {row['_id']!r} repeated with a different text")
    return queries


def read_qrels(
    path: str | os.PathLike, filesystem: pafs.FileSystem | None = None
) -> dict[str, dict[str, int]]:
    """query id -> {doc id: grade}. A (query, doc) pair judged twice with different grades is an error
    (trec_eval rejects duplicate judgments; BEIR would keep the last one silently)."""
    qrels: dict[str, dict[str, int]] = {}
    for where, row in _iter_rows(path, QRELS_FIELDS, filesystem):
        judged = qrels.setdefault(row["query-id"], {})
        if judged.setdefault(row["corpus-id"], row["score"]) != row["score"]:
            raise RetrievalDataError(
                f"{where}: query {row['query-id']!r} judges document {row['corpus-id']!r} twice, "
                f"{judged[row['corpus-id']]} and {row['score']}"
            )
    return qrels


def load_beir(
    folder: str | os.PathLike, split: str = "test", filesystem: pafs.FileSystem | None = None
) -> RetrievalSet:
    """A BEIR folder: corpus.<ext>, queries.<ext>, qrels/<split>.<ext> (or qrels.<ext>), any format."""
    fs, root = _filesystem(folder, filesystem)
    names = {
        posixpath.relpath(info.path, root)
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if info.type == pafs.FileType.File
    }

    def find(*stems: str) -> str:
        found = sorted(n for n in names if any(_stem(n) == s for s in stems))
        if len(found) != 1:
            what = "no file" if not found else f"{len(found)} files ({', '.join(found)})"
            raise RetrievalDataError(
                f"{os.fspath(folder)}: {what} for {' or '.join(stems)}; want exactly one"
            )
        return posixpath.join(root, found[0])

    paths = [find("corpus"), find("queries"), find(f"qrels/{split}", "qrels")]  # all found before any is read
    return RetrievalSet(
        corpus=read_corpus(paths[0], fs), queries=read_queries(paths[1], fs), qrels=read_qrels(paths[2], fs)
    )


def _stem(name: str) -> str:
    stem, suffix = posixpath.splitext(name)
    if suffix.lower() in COMPRESSION:
        stem, suffix = posixpath.splitext(stem)
    return stem if suffix.lower() in FORMATS else ""


def _filesystem(path: str | os.PathLike, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    if filesystem is None:
        return pafs.LocalFileSystem(), os.path.abspath(os.fspath(path))
    return filesystem, os.fspath(path)


def _iter_rows(
    path: str | os.PathLike, fields: tuple[_Field, ...], filesystem: pafs.FileSystem | None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(place for errors, {canonical name: converted value}) for every record of the file."""
    fmt, compression = detect_format(path)
    fs, fs_path = _filesystem(path, filesystem)
    shown = os.fspath(path)
    try:
        if fmt == "parquet":
            yield from _parquet_rows(fs, fs_path, shown, fields)
        else:
            with fs.open_input_stream(fs_path, compression=compression) as stream:
                rows = _jsonl_rows if fmt == "jsonl" else _tsv_rows
                yield from rows(_lines(stream, shown), shown, fields)
    except FileNotFoundError as e:
        raise RetrievalDataError(f"{shown}: no such file") from e
    except (OSError, pa.ArrowException) as e:
        raise RetrievalDataError(f"{shown}: unreadable ({type(e).__name__}: {e})") from e


def _lines(stream, shown: str, chunk_bytes: int = 1 << 22) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line with its newline) of a binary stream; splitting the bytes at
    b"\\n" is safe because UTF-8 never uses that byte inside a multi-byte character."""
    lineno, pending = 0, b""
    while chunk := stream.read(chunk_bytes):
        *complete, pending = (pending + chunk).split(b"\n")
        for raw in complete:
            lineno += 1
            yield lineno, _decode(raw + b"\n", shown, lineno)
    if pending:
        yield lineno + 1, _decode(pending, shown, lineno + 1)


def _decode(raw: bytes, shown: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RetrievalDataError(f"{shown}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from e


def _jsonl_rows(
    lines: Iterator[tuple[int, str]], shown: str, fields: tuple[_Field, ...]
) -> Iterator[tuple[str, dict[str, Any]]]:
    for lineno, line in lines:
        if not line.strip():  # blank lines are not records (a trailing newline, say)
            continue
        where = f"{shown}:{lineno}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise RetrievalDataError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise RetrievalDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, _convert(obj, fields, where)


def _tsv_rows(
    lines: Iterator[tuple[int, str]], shown: str, fields: tuple[_Field, ...]
) -> Iterator[tuple[str, dict[str, Any]]]:
    last_line = 0

    def text_lines() -> Iterator[str]:
        nonlocal last_line
        for lineno, line in lines:
            last_line = lineno
            yield line

    # csv's default quoting (QUOTE_MINIMAL), as BEIR's loader reads its tsv files.
    reader = csv.reader(text_lines(), delimiter="\t")
    header: list[str] | None = None
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise RetrievalDataError(f"{shown}:{last_line}: {e}") from e
        if not record:  # a blank line
            continue
        # A quoted field may span lines: name the record's first line.
        first_line = last_line - sum(field.count("\n") for field in record)
        where = f"{shown}:{first_line}"
        if header is None:
            header = record
            missing = [f.name for f in fields if f.required and not set(f.aliases) & set(header)]
            if missing:
                raise RetrievalDataError(
                    f"{where}: header {header} lacks {' and '.join(missing)}; the first line names the "
                    f"columns ({', '.join(f.name for f in fields)})"
                )
            continue
        if len(record) != len(header):
            raise RetrievalDataError(
                f"{where}: {len(record)} tab-separated fields, the header has {len(header)}"
            )
        yield where, _convert(dict(zip(header, record, strict=True)), fields, where)


def _parquet_rows(
    fs: pafs.FileSystem, fs_path: str, shown: str, fields: tuple[_Field, ...], batch_rows: int = 65536
) -> Iterator[tuple[str, dict[str, Any]]]:
    with fs.open_input_file(fs_path) as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        columns: dict[str, str] = {}  # canonical -> column in the file
        for f in fields:
            present = [a for a in f.aliases if a in names]
            if present:
                columns[f.name] = present[0]
            elif f.required:
                raise RetrievalDataError(f"{shown}: no column {' or '.join(f.aliases)} (columns: {names})")
        row = 0
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(columns.values())):
            values = {name: batch.column(col).to_pylist() for name, col in columns.items()}
            for i in range(batch.num_rows):
                where = f"{shown}: row {row}"
                yield (
                    where,
                    _convert({name: values[name][i] for name in columns}, fields, where, canonical=True),
                )
                row += 1


def _convert(
    raw: Mapping[str, Any],
    fields: tuple[_Field, ...],
    where: str,
    *,
    canonical: bool = False,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields:
        keys = (f.name,) if canonical else f.aliases
        value = next((raw[k] for k in keys if k in raw), None)
        if value is None:
            if f.required:
                raise RetrievalDataError(f"{where}: missing {' or '.join(f.aliases)}")
            out[f.name] = ""
            continue
        if f.kind == "id":
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise RetrievalDataError(f"{where}: {f.name} must be a string or an integer, got {value!r}")
            value = str(value)
            if not value:
                raise RetrievalDataError(f"{where}: {f.name} is empty")
        elif f.kind == "text":
            if not isinstance(value, str):
                raise RetrievalDataError(f"{where}: {f.name} must be a string, got {type(value).__name__}")
        else:
            value = _grade(value, f.name, where)
        out[f.name] = value
    return out


def _grade(value: Any, name: str, where: str) -> int:
    """An integer relevance grade: 1, 1.0 and "1" are 1; 0.5, "yes" and true are errors."""
    if isinstance(value, str):
        try:
            value = float(value.strip()) if value.strip() else None
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or int(value) != value:
        raise RetrievalDataError(f"{where}: {name} must be an integer grade, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def write_corpus(
    path: str | os.PathLike,
    corpus: Mapping[str, Mapping[str, str]] | Iterable[CorpusDoc],
    filesystem: pafs.FileSystem | None = None,
) -> None:
    """Write `corpus` ({id: {"title", "text"}} or CorpusDocs) in the format the file name says."""
    if isinstance(corpus, Mapping):
        docs: Iterable[CorpusDoc] = (
            CorpusDoc(id_, d.get("title", "") or "", d["text"]) for id_, d in corpus.items()
        )
    else:
        docs = corpus
    _write(path, CORPUS_FIELDS, ([d.id, d.title, d.text] for d in docs), filesystem)


def write_queries(
    path: str | os.PathLike, queries: Mapping[str, str], filesystem: pafs.FileSystem | None = None
) -> None:
    _write(path, QUERY_FIELDS, ([qid, text] for qid, text in queries.items()), filesystem)


def write_qrels(
    path: str | os.PathLike, qrels: Mapping[str, Mapping[str, int]], filesystem: pafs.FileSystem | None = None
) -> None:
    rows = ([qid, doc, int(grade)] for qid, judged in qrels.items() for doc, grade in judged.items())
    _write(path, QRELS_FIELDS, rows, filesystem)


def _write(
    path: str | os.PathLike,
    fields: tuple[_Field, ...],
    rows: Iterable[list[Any]],
    filesystem: pafs.FileSystem | None,
) -> None:
    fmt, compression = detect_format(path)
    fs, fs_path = _filesystem(path, filesystem)
    names = [f.name for f in fields]
    parent = posixpath.dirname(fs_path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if fmt == "parquet":
        columns = list(zip(*rows, strict=True)) or [()] * len(names)
        types = [pa.int64() if f.kind == "grade" else pa.string() for f in fields]
        table = pa.table(
            {n: pa.array(list(c), type=t) for n, c, t in zip(names, columns, types, strict=True)}
        )
        pq.write_table(table, fs_path, filesystem=fs)
        return
    with fs.open_output_stream(fs_path, compression=compression) as stream:
        if fmt == "jsonl":
            for row in rows:
                obj = dict(zip(names, row, strict=True))
                stream.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
        else:
            buffer = _LineBuffer()
            writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
            # QUOTE_MINIMAL quotes tab, newline and quote but not a lone "\r", which readers take for a
            # line end: rows holding one are written fully quoted.
            quoted = csv.writer(buffer, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_ALL)
            writer.writerow(names)
            for row in rows:
                (quoted if any("\r" in str(v) for v in row) else writer).writerow(row)
                if len(buffer.parts) >= 4096:
                    stream.write(buffer.take())
            stream.write(buffer.take())


class _LineBuffer:
    """A text sink for csv.writer whose contents are taken as UTF-8 bytes."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def take(self) -> bytes:
        data, self.parts = "".join(self.parts).encode("utf-8"), []
        return data
