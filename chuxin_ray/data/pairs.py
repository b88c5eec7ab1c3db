"""Training pairs in FlagEmbedding's jsonl format, read and checked row by row.

One line per example: {"query": str, "pos": [str, ...], "neg": [str, ...], "pos_scores": [float, ...],
"neg_scores": [float, ...], "prompt": str, "type": str}; the scores, prompt and type are optional. A
good row becomes a row of PAIR_SCHEMA; a bad one a row of QUARANTINE_SCHEMA naming the file, the line
and the reason, with the raw bytes. Nothing is dropped silently: kept + quarantined = lines read.

A dataset is one input file; the sharded output of a stage (`part-NNNNN.jsonl` files in a folder) is one
dataset per folder. Same-dataset batching and per-dataset query instructions use these names.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from chuxin_ray.data.records import (
    COMPRESSION,
    INVALID_JSON,
    INVALID_UTF8,
    MISSING_FIELD,
    NOT_AN_OBJECT,
    READ_ERRORS,
    UNREADABLE_FILE,
    WRONG_TYPE,
    _iter_lines,
)

PAIR_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),  # 1-based line in the source file
        ("query", pa.string()),
        ("pos", pa.list_(pa.string())),
        ("neg", pa.list_(pa.string())),
        ("pos_scores", pa.list_(pa.float32())),  # null when the row has none
        ("neg_scores", pa.list_(pa.float32())),
        ("prompt", pa.string()),  # the row's own query instruction, null when absent
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [("path", pa.string()), ("row", pa.int64()), ("reason", pa.string()), ("raw", pa.binary())]
)

# Why a pair row is quarantined, besides the reasons shared with ingest (records.py).
EMPTY_QUERY = "empty_query"
NO_POSITIVE = "no_positive"
TOO_FEW_NEGATIVES = "too_few_negatives"
SCORES_MISMATCH = "scores_mismatch"  # pos_scores / neg_scores not one number per passage
MISSING_SCORES = "missing_scores"  # distillation asks for teacher scores the row lacks

PAIR_SUFFIXES = (".jsonl", ".json", ".ndjson")
SHARD_NAME = re.compile(r"^part-\d+$")


@dataclass(frozen=True)
class PairFile:
    """One input file of pairs; picklable for Ray tasks."""

    fs: pafs.FileSystem
    path: str
    uri: str
    dataset: str
    index: int  # position in the sorted list of input files
    size: int = 0  # bytes


def is_pair_file(path: str) -> bool:
    name = path.lower()
    for suffix in COMPRESSION:
        name = name.removesuffix(suffix)
    return name.endswith(PAIR_SUFFIXES)


def dataset_name(path: str, root: str) -> str:
    """`root/a/b.jsonl.gz` -> `a/b`; `root/a/part-00003.jsonl` -> `a` (a stage's shards are one dataset);
    a file given as the input itself -> its stem."""
    rel = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
    stem = rel
    for suffix in COMPRESSION:
        stem = stem.removesuffix(suffix)
    stem = posixpath.splitext(stem)[0]
    folder, name = posixpath.split(stem)
    if SHARD_NAME.match(name):
        return folder or posixpath.basename(root.rstrip("/")) or "data"
    return stem


def check_row(obj: Any, group_size: int, need_scores: bool) -> str | tuple[str, str] | dict:
    """The row as PAIR_SCHEMA values, or the reason it is bad (with the field, for messages)."""
    if not isinstance(obj, dict):
        return NOT_AN_OBJECT
    for name in ("query", "pos"):
        if name not in obj:
            return MISSING_FIELD, name
    query = obj["query"]
    if not isinstance(query, str):
        return WRONG_TYPE, "query"
    if not query.strip():
        return EMPTY_QUERY
    lists = {}
    for name in ("pos", "neg"):
        value = obj.get(name, [])
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            return WRONG_TYPE, name
        lists[name] = value
    if not any(t.strip() for t in lists["pos"]):
        return NO_POSITIVE
    if group_size > 1 and not lists["neg"]:
        return TOO_FEW_NEGATIVES
    scores = {}
    for name in ("pos_scores", "neg_scores"):
        value = obj.get(name)
        if value is None:
            if need_scores:
                return MISSING_SCORES, name
            scores[name] = None
            continue
        if not isinstance(value, list) or not all(
            isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s) for s in value
        ):
            return WRONG_TYPE, name
        if len(value) != len(lists[name.removesuffix("_scores")]):
            return SCORES_MISMATCH, name
        scores[name] = [float(s) for s in value]
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        return WRONG_TYPE, "prompt"
    return {"query": query, **lists, **scores, "prompt": prompt}


class _Tables:
    """Accumulates kept and quarantined rows and cuts them into tables."""

    def __init__(self, file: PairFile) -> None:
        self.file = file
        self.kept: dict[str, list] = {name: [] for name in PAIR_SCHEMA.names}
        self.bad: dict[str, list] = {name: [] for name in QUARANTINE_SCHEMA.names}
        self.counts: Counter = Counter()

    def keep(self, row: int, values: dict) -> None:
        self.kept["row"].append(row)
        for name, value in values.items():
            self.kept[name].append(value)
        self.counts["kept"] += 1

    def quarantine(self, row: int, reason: str, raw: bytes) -> None:
        for name, value in (("path", self.file.uri), ("row", row), ("reason", reason), ("raw", raw)):
            self.bad[name].append(value)
        self.counts[reason] += 1

    def take_kept(self) -> pa.Table:
        table = pa.table(self.kept, schema=PAIR_SCHEMA)
        self.kept = {name: [] for name in PAIR_SCHEMA.names}
        return table

    def take_quarantine(self) -> pa.Table:
        table = pa.table(self.bad, schema=QUARANTINE_SCHEMA)
        self.bad = {name: [] for name in QUARANTINE_SCHEMA.names}
        return table


def read_pairs(
    file: PairFile, group_size: int, need_scores: bool, batch_rows: int = 65_536
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """(kept, quarantined) tables of up to `batch_rows` lines each, in line order; the counts by outcome
    are in the returned tables' row counts and reasons. A read error mid-file quarantines the rest of
    the file under `unreadable_file` (one row, at the line it stopped)."""
    tables = _Tables(file)
    compression = COMPRESSION.get(posixpath.splitext(file.path)[1].lower())
    lineno = 0
    try:
        with file.fs.open_input_stream(file.path, compression=compression, buffer_size=1 << 23) as stream:
            for lineno, line in _iter_lines(stream):
                if not line.strip():
                    continue
                _parse_line(line, lineno, group_size, need_scores, tables)
                if len(tables.kept["row"]) + len(tables.bad["row"]) >= batch_rows:
                    yield tables.take_kept(), tables.take_quarantine()
    except READ_ERRORS as e:
        tables.quarantine(lineno + 1, UNREADABLE_FILE, f"{type(e).__name__}: {e}".encode())
    yield tables.take_kept(), tables.take_quarantine()


def _parse_line(line: bytes, lineno: int, group_size: int, need_scores: bool, tables: _Tables) -> None:
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeError:
        tables.quarantine(lineno, INVALID_UTF8, line)
        return
    except json.JSONDecodeError:
        tables.quarantine(lineno, INVALID_JSON, line)
        return
    checked = check_row(obj, group_size, need_scores)
    if isinstance(checked, dict):
        try:  # a \ud800 escape decodes to a lone surrogate, which Arrow cannot store
            for value in (checked["query"], *checked["pos"], *checked["neg"], checked["prompt"] or ""):
                value.encode("utf-8")
        except UnicodeError:
            tables.quarantine(lineno, INVALID_UTF8, line)
            return
        tables.keep(lineno, checked)
    else:
        reason = checked[0] if isinstance(checked, tuple) else checked
        tables.quarantine(lineno, reason, line)
