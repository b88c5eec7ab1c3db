"""Reading jsonl and parquet into records: every source record becomes exactly one row."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import zstandard

from chuxin_ray.data import records
from chuxin_ray.data.records import SourceFile, detect_format, read_records, source_name


def source(path, fmt="jsonl", text="text", id_field=None, index=0):
    return SourceFile(pafs.LocalFileSystem(), str(path), str(path), fmt, "src", text, id_field, index, 0)


def rows(file, batch_rows=3):
    tables = list(read_records(file, batch_rows))
    assert all(t.schema == records.RECORD_SCHEMA for t in tables)
    return pa.concat_tables(tables).to_pylist() if tables else []


LINES = [
    b'{"id": 1, "text": "\xe4\xbd\xa0\xe5\xa5\xbd"}',  # good, int id
    b'{"id": "a", "text": "ok"}',
    b"{broken json",
    b'{"id": "b", "text": "bad \xff byte"}',
    b'{"id": "c"}',
    b'{"id": "d", "text": 123}',
    b'{"id": "e", "text": "   "}',
    b"[1, 2]",
    b'{"id": "f", "text": "lone \\ud800 surrogate"}',
    b'{"id": true, "text": "bool id"}',
    b"",  # blank lines are not records
    b'{"text": "no id"}',
]
REASONS = [
    "",
    "",
    "invalid_json",
    "invalid_utf8",
    "missing_field",
    "wrong_type",
    "empty_text",
    "not_an_object",
    "invalid_utf8",
    "wrong_type",
    "missing_field",
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_every_line_accounted(tmp_path, suffix):
    data = b"\r\n".join(LINES)  # CRLF too
    path = tmp_path / f"f{suffix}"
    if suffix.endswith(".gz"):
        data = gzip.compress(data)
    elif suffix.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    out = rows(source(path, id_field="id"))
    assert [r["reason"] for r in out] == REASONS
    assert [r["row"] for r in out] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12]
    assert out[0]["id"] == "1" and out[0]["text"] == "你好" and out[0]["outcome"] == "kept"
    bad = out[3]
    assert bad["outcome"] == "quarantined" and bad["raw"] == LINES[3] and bad["text"] is None
    assert all(r["path"] == str(path) and r["source"] == "src" for r in out)


def test_derived_ids_are_stable_and_content_based(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"t": "同一段文字"}\n{"t": "另一段"}\n{"t": "同一段文字"}\n')
    out = rows(source(path, text="t"))
    assert out[0]["id"] == out[2]["id"] == records.record_id("src", "同一段文字") != out[1]["id"]


def test_order_is_global(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    out = rows(source(path, index=3))
    assert [r["order"] for r in out] == [(3 << 32) + 1, (3 << 32) + 2]


def test_parquet_types_and_nulls(tmp_path):
    path = tmp_path / "f.parquet"
    pq.write_table(
        pa.table({"content": ["好的", None, "  ", "行"], "other": [1, 2, 3, 4]}), path, row_group_size=2
    )
    out = rows(source(path, "parquet", text="content"))
    assert [r["reason"] for r in out] == ["", "missing_field", "empty_text", ""]
    assert [r["row"] for r in out] == [0, 1, 2, 3]
    assert json.loads(out[1]["raw"]) == {"content": None}


def test_parquet_wrong_column_type_and_missing_column(tmp_path):
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    assert [r["reason"] for r in rows(source(path, "parquet"))] == ["wrong_type", "wrong_type"]
    assert [r["reason"] for r in rows(source(path, "parquet", text="body"))] == ["missing_field"] * 2


def test_unreadable_file_is_one_quarantined_row(tmp_path):
    path = tmp_path / "f.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "\xe5\xa5\xbd\xe7\x9a\x84"}\n' * 3)[:-12] + b"garbage!")
    out = rows(source(path))
    assert out[-1]["reason"] == "unreadable_file" and out[-1]["outcome"] == "quarantined"
    assert out[-1]["raw"].startswith(b"OSError")  # the reader's error, for whoever repairs the file
    not_parquet = tmp_path / "g.parquet"
    not_parquet.write_bytes(b"not a parquet file at all")
    assert [r["reason"] for r in rows(source(not_parquet, "parquet"))] == ["unreadable_file"]


def test_format_and_source_names():
    assert detect_format("a/b.jsonl.gz") == "jsonl"
    assert detect_format("a/b.JSONL.ZST") == "jsonl"
    assert detect_format("a/b.parquet") == "parquet"
    assert detect_format("a/b.csv") is None
    assert source_name("s3://b/corpora/news.jsonl.gz") == "news"
    assert source_name("s3://b/corpora/reviews/") == "reviews"


def test_fast_jsonl_path_equals_plain_path(tmp_path):
    """STYLE.md rule 7: pyarrow's block parser gives the plain line-by-line result, block by block,
    whether a block is all good (fast) or holds a bad line (falls back)."""
    import random

    from chuxin_ray import demo

    rng = random.Random(1)
    texts = demo.reviews()[:3000]
    lines = []
    for i, text in enumerate(texts):
        lines.append(json.dumps({"id": i if i % 2 else f"s{i}", "text": text}, ensure_ascii=False).encode())
        if rng.random() < 0.002:
            lines.append(rng.choice(LINES))  # a bad record lands in a few blocks
        if rng.random() < 0.001:
            lines.append(b"")
    lines.append(json.dumps({"id": 1.5, "text": "浮点 id"}, ensure_ascii=False).encode())
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines))
    for id_field in ("id", None):
        file = source(path, id_field=id_field)
        fast = pa.concat_tables(read_records(file, batch_rows=256, fast=True))
        plain = pa.concat_tables(read_records(file, batch_rows=256, fast=False))
        assert fast.equals(plain)
        assert Counter(fast.column("outcome").to_pylist())["kept"] >= 3000


def _good_lines(count, start=0):
    from chuxin_ray import demo

    texts = demo.people_daily()[start : start + count]
    return [json.dumps({"id": f"p{i}", "text": t}, ensure_ascii=False).encode() for i, t in enumerate(texts)]


GOOD = _good_lines(12)
# Each case: the lines of a file, joined by "\n" unless they carry their own ending.
EDGE_CASES = {
    "exact_blocks": b"\n".join(GOOD) + b"\n",  # 12 lines: blocks of 3 and 4 end on the last line
    "no_final_newline": b"\n".join(GOOD),
    "crlf": b"\r\n".join(GOOD) + b"\r\n",
    "crlf_no_final_newline": b"\r\n".join(GOOD) + b"\r",
    "doubled_cr": b"\r\r\n".join(GOOD),
    "blank_lines_at_edges": b"\n".join(
        [b"", b" ", *GOOD[:3], b"", b"\t\r", *GOOD[3:8], b"\r", *GOOD[8:], b"", b""]
    ),
    "blank_lines_inside": b"\n".join([*GOOD[:2], b"", *GOOD[2:5], b"  \x0b\x0c ", *GOOD[5:]]),
    "only_blank": b"\n\n \r\n\t",
    "empty": b"",
    "leading_space": b"\n".join([b"  " + line for line in GOOD[:5]] + [b"\t" + GOOD[5], *GOOD[6:]]),
    "bad_line_in_block": b"\n".join([*GOOD[:5], LINES[2], *GOOD[5:9], LINES[3], *GOOD[9:]]),
    "every_bad_line": b"\n".join(GOOD[:2] + LINES + GOOD[2:]),
    "two_objects_on_a_line": b"\n".join([*GOOD[:4], GOOD[4] + b" " + GOOD[5], *GOOD[6:]]),
    "unicode_space_texts": b"\n".join(
        [
            *GOOD[:4],
            '{"id": "u1", "text": "\u3000\u3000人民日报"}'.encode(),  # starts with a space, not blank
            '{"id": "u2", "text": "\u3000\u2028\u00a0 "}'.encode(),  # only spaces: empty_text
            b'{"id": "u3", "text": ""}',
            b'{"id": "u4", "text": "\\u3000\\t"}',  # escaped spaces
            *GOOD[4:],
        ]
    ),
    "mixed_id_types": b"\n".join([*GOOD[:5], b'{"id": 7, "text": "\xe5\xa5\xbd"}', *GOOD[5:]]),
    "long_lines": b"\n".join(
        _good_lines(6, start=100) + [json.dumps({"id": "l", "text": "长" * 3000}).encode()]
    ),
}
CLEAN_CASES = (
    "exact_blocks",
    "no_final_newline",
    "crlf",
    "crlf_no_final_newline",
    "doubled_cr",
    "leading_space",
)


def _fast_and_plain(file, batch_rows):
    fast = list(read_records(file, batch_rows, fast=True))
    plain = list(read_records(file, batch_rows, fast=False))
    assert len(fast) == len(plain)  # the same blocks ...
    for f, p in zip(fast, plain, strict=True):
        assert f.schema == p.schema == records.RECORD_SCHEMA
        assert f.equals(p), (f.to_pylist(), p.to_pylist())  # ... with the same rows
    return plain


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("read_bytes", [1 << 22, 64, 7])  # small reads: lines and blocks span reads
def test_fast_jsonl_edge_cases_equal_plain_path(tmp_path, monkeypatch, case, read_bytes):
    for reader in (records._iter_lines, records._iter_line_ranges):
        monkeypatch.setattr(reader, "__defaults__", (read_bytes,))
    for suffix, compress in ((".jsonl", bytes), (".jsonl.gz", gzip.compress)):
        path = tmp_path / f"f{suffix}"
        path.write_bytes(compress(EDGE_CASES[case]))
        for id_field in ("id", None):
            for batch_rows in (1, 3, 4, 5, 12, 1000):
                _fast_and_plain(source(path, id_field=id_field, index=2), batch_rows)
    if case in CLEAN_CASES:  # all good records: no line goes the plain way
        monkeypatch.setattr(records, "parse_jsonl_line", None)
        for batch_rows in (1, 5, 1000):
            list(read_records(source(path, id_field="id"), batch_rows))


@pytest.mark.parametrize("read_bytes", [1 << 22, 100])
def test_fast_jsonl_corrupt_gzip_equals_plain_path(tmp_path, monkeypatch, read_bytes):
    for reader in (records._iter_lines, records._iter_line_ranges):
        monkeypatch.setattr(reader, "__defaults__", (read_bytes,))
    data = gzip.compress(b"\n".join(_good_lines(400)) + b"\n")
    for name, broken in (("garbage", data[:-12] + b"garbage!"), ("truncated", data[: len(data) // 2])):
        path = tmp_path / f"{name}.jsonl.gz"
        path.write_bytes(broken)
        for batch_rows in (1, 7, 64, 1000):
            out = pa.concat_tables(_fast_and_plain(source(path, id_field="id"), batch_rows)).to_pylist()
            assert out[-1]["reason"] == "unreadable_file"
            assert out[-1]["row"] == len(out)  # one past the last line read
            if read_bytes == 100:
                assert len(out) > 100  # rows read before the failure come first
