"""BEIR / C-MTEB retrieval sets: jsonl, tsv and parquet round-trip; malformed input names file and line."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chuxin_ray.retrieval.io import (
    CorpusDoc,
    RetrievalDataError,
    iter_corpus,
    load_beir,
    read_corpus,
    read_qrels,
    read_queries,
    write_corpus,
    write_qrels,
    write_queries,
)

CORPUS = {
    "d1": {"title": "北京", "text": "北京是中华人民共和国的首都。"},
    "d2": {"title": "", "text": 'a tab\there, a "quote", a newline\nand a\r\ncarriage return'},
    "d3": {"title": '"leading quote', "text": "emoji 🙂 and \\ backslash"},
    "10": {"title": "numeric-looking id", "text": ""},
}
QUERIES = {"q1": "中国的首都是哪里？", "q2": 'text with\ttab and "quotes"', "7": "line\nbreak"}
QRELS = {"q1": {"d1": 2, "d2": 0}, "q2": {"d2": 1, "d3": 1, "10": 3}, "7": {"d1": -1}}
SUFFIXES = [".jsonl", ".tsv", ".parquet", ".jsonl.gz", ".tsv.zst"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip(tmp_path: Path, suffix: str):
    write_corpus(tmp_path / f"corpus{suffix}", CORPUS)
    write_queries(tmp_path / f"queries{suffix}", QUERIES)
    write_qrels(tmp_path / "qrels" / f"test{suffix}", QRELS)

    assert read_corpus(tmp_path / f"corpus{suffix}") == CORPUS
    assert read_queries(tmp_path / f"queries{suffix}") == QUERIES
    assert read_qrels(tmp_path / "qrels" / f"test{suffix}") == QRELS
    assert list(iter_corpus(tmp_path / f"corpus{suffix}")) == [
        CorpusDoc(i, d["title"], d["text"]) for i, d in CORPUS.items()
    ]
    loaded = load_beir(tmp_path, split="test")
    assert (loaded.corpus, loaded.queries, loaded.qrels) == (CORPUS, QUERIES, QRELS)


def test_reads_beir_files_as_shipped(tmp_path: Path):
    # scifact's layout: corpus/queries jsonl (no title in queries, extra metadata), qrels tsv with a header
    (tmp_path / "corpus.jsonl").write_text(
        '{"_id": "4983", "title": "Microstructural development", "text": "Alterations of the ...", "metadata": {}}\n'
        '{"_id": "5836", "title": "", "text": "Myelodysplastic syndromes ..."}\n',
        encoding="utf-8",
    )
    (tmp_path / "queries.jsonl").write_text(
        '{"_id": "1", "text": "0-dimensional biomaterials", "metadata": {}}\n'
    )
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\t4983\t1\n1\t5836\t0\n")
    s = load_beir(tmp_path)
    assert s.corpus["4983"]["title"] == "Microstructural development"
    assert s.queries == {"1": "0-dimensional biomaterials"}
    assert s.qrels == {"1": {"4983": 1, "5836": 0}}


def test_reads_cmteb_column_names_and_integer_ids(tmp_path: Path):
    # C-MTEB's hub datasets: corpus/queries (id, text), qrels (qid, pid, score); ids may be integers
    pq.write_table(pa.table({"id": [1, 2], "text": ["甲", "乙"]}), tmp_path / "corpus.parquet")
    pq.write_table(pa.table({"id": ["q"], "text": ["问"]}), tmp_path / "queries.parquet")
    pq.write_table(
        pa.table({"qid": ["q", "q"], "pid": [1, 2], "score": [1.0, 0.0]}), tmp_path / "qrels.parquet"
    )
    s = load_beir(tmp_path)
    assert s.corpus == {"1": {"title": "", "text": "甲"}, "2": {"title": "", "text": "乙"}}
    assert s.qrels == {"q": {"1": 1, "2": 0}}
    (tmp_path / "more.jsonl").write_text('{"qid": "q", "pid": 3, "score": "2"}\n')
    assert read_qrels(tmp_path / "more.jsonl") == {"q": {"3": 2}}


def error_of(call, *args) -> str:
    with pytest.raises(RetrievalDataError) as info:
        call(*args)
    return str(info.value)


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    ("content", "line", "says"),
    [
        ('{"_id": "a", "text": "x"}\n\n{"_id": "b", "text": "y"\n', 3, "not valid JSON"),
        ('{"_id": "a", "text": "x"}\n["b", "y"]\n', 2, "expected a JSON object, got list"),
        ('{"_id": "a", "text": "x"}\n{"_id": "b"}\n', 2, "missing text"),
        ('{"_id": 1.5, "text": "x"}\n', 1, "_id must be a string or an integer"),
        ('{"_id": true, "text": "x"}\n', 1, "_id must be a string or an integer"),
        ('{"_id": "", "text": "x"}\n', 1, "_id is empty"),
        ('{"_id": "a", "text": ["x"]}\n', 1, "text must be a string, got list"),
        ('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "other"}\n', 2, "repeated with a different text"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, content: str, line: int, says: str):
    path = write(tmp_path / "queries.jsonl", content)
    message = error_of(read_queries, path)
    assert message.startswith(f"{path}:{line}: "), message
    assert says in message


@pytest.mark.parametrize(
    ("content", "line", "says"),
    [
        ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\n", 3, "2 tab-separated fields, the header has 3"),
        ("query-id\tcorpus-id\tscore\nq1\td1\t0.5\n", 2, "score must be an integer grade, got 0.5"),
        ("query-id\tcorpus-id\tscore\nq1\td1\tyes\n", 2, "score must be an integer grade"),
        ("q1\td1\t1\n", 1, "lacks query-id and corpus-id and score"),
        ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t2\n", 3, "judges document 'd1' twice, 1 and 2"),
        ('query-id\tcorpus-id\tscore\n"q\n1"\td1\t1\nq2\t\t1\n', 4, "corpus-id is empty"),
        (
            "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td\r2\t1\n",
            3,
            "new-line character seen in unquoted field",
        ),
    ],
)
def test_malformed_tsv_names_file_and_line(tmp_path: Path, content: str, line: int, says: str):
    path = write(tmp_path / "test.tsv", content)
    message = error_of(read_qrels, path)
    assert message.startswith(f"{path}:{line}: "), message
    assert says in message


def test_invalid_utf8_and_compressed_files_name_the_line(tmp_path: Path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b'{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "\xff"}\n')
    assert error_of(read_corpus, path).startswith(f"{path}:2: not valid UTF-8")
    gz = tmp_path / "queries.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"_id": "a", "text": "x"}) + "\n" + "{broken\n")
    assert error_of(read_queries, gz).startswith(f"{gz}:2: not valid JSON")


def test_malformed_parquet_names_file_and_row(tmp_path: Path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"_id": ["a", "b", "c"], "text": ["x", "y", None]}), path)
    assert error_of(read_corpus, path) == f"{path}: row 2: missing text"
    pq.write_table(pa.table({"_id": ["a"], "body": ["x"]}), path)
    assert re.match(
        rf"{re.escape(str(path))}: no column text \(columns: \['_id', 'body'\]\)", error_of(read_corpus, path)
    )
    pq.write_table(pa.table({"query-id": ["q"], "corpus-id": ["d"], "score": [0.5]}), path)
    assert error_of(read_qrels, path) == f"{path}: row 0: score must be an integer grade, got 0.5"
    bad = write(tmp_path / "broken.parquet", "not parquet at all")
    assert error_of(read_corpus, bad).startswith(f"{bad}: unreadable")


def test_files_and_folders_that_cannot_be_read(tmp_path: Path):
    assert error_of(read_corpus, tmp_path / "corpus.csv").startswith(
        f"{tmp_path / 'corpus.csv'}: unknown format"
    )
    assert error_of(read_corpus, tmp_path / "absent.jsonl") == f"{tmp_path / 'absent.jsonl'}: no such file"
    write(tmp_path / "corpus.jsonl", '{"_id": "a", "text": "x"}\n')
    write(tmp_path / "corpus.tsv", "_id\ttext\na\tx\n")
    assert "2 files (corpus.jsonl, corpus.tsv) for corpus" in error_of(load_beir, tmp_path)
    (tmp_path / "corpus.tsv").unlink()
    assert "no file for queries" in error_of(load_beir, tmp_path)
