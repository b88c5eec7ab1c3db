"""Ingest end to end from s3:// on the local S3 server, on a local Ray, with real Chinese text.

~12,000 records of People's Daily and shopping reviews across jsonl, jsonl.gz, jsonl.zst and
parquet, with planted bad records of 7 kinds and planted duplicates across files and formats.
The stage's output is checked against a plain single-process ingest written here.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

from chuxin_ray import demo, storage
from chuxin_ray.config import CleaningRules, load_config
from chuxin_ray.data.cleaning import RuleSet, normalize_text
from chuxin_ray.data.key_claims import Displaced, KeyClaims
from chuxin_ray.data.records import record_id
from chuxin_ray.data.shards import read_table
from chuxin_ray.stages import ingest
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

pytestmark = pytest.mark.integration

RULES = {"min_chars": 8, "blocklist": ["加微信"]}
PLANTED_BAD = {  # reason -> how many are planted
    "invalid_json": 12,
    "invalid_utf8": 11,
    "missing_field": 13,
    "wrong_type": 10,
    "empty_text": 9,
    "not_an_object": 5,
    "unreadable_file": 1,
}


def line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def build_corpus():
    """{key: bytes} of the files to upload, and the plain-reference records in file order."""
    news = demo.people_daily()[:8000]
    reviews = demo.reviews()[:4000]
    files: dict[str, list] = {"news/a.jsonl.gz": [], "news/b.jsonl.zst": [], "reviews/c.jsonl": []}
    for i, text in enumerate(news):
        files["news/a.jsonl.gz" if i < 4000 else "news/b.jsonl.zst"].append(
            line({"id": f"pd-{i}", "text": text})
        )
    for text in reviews[:2000]:
        files["reviews/c.jsonl"].append(line({"content": text, "id": "ignored"}))
    # Planted duplicates: exact copies of news in another file and format, and copies that differ
    # only in width, case and spacing (equal after normalisation).
    for i in range(60):
        files["reviews/c.jsonl"].append(line({"content": news[i * 7]}))
    for i in range(30):
        files["reviews/c.jsonl"].append(line({"content": " ".join(news[i * 11 + 1]).replace("，", ",")}))
    # Planted bad records in the jsonl files.
    bad = files["reviews/c.jsonl"]
    bad += [b'{"content": "\xe5\xa5\xbd", broken'] * 12
    bad += [b'{"content": "bad \xff\xfe bytes \xe5\xa5"}'] * 11
    bad += [line({"text": "wrong field"})] * 10
    bad += [line({"content": 42})] * 10
    bad += [line({"content": "  \t "})] * 9
    bad += [b"[1, 2, 3]"] * 5
    bad += [line({"content": news[5] + "加微信领取"})] * 2  # blocklisted, not bad input
    parquet_texts = reviews[2000:4000] + [news[3]] * 20 + [None] * 3
    return files, parquet_texts


def upload(s3_server, bucket, files, parquet_texts):
    client = s3_server.client()
    for key, lines in files.items():
        data = b"\n".join(lines) + b"\n"
        if key.endswith(".gz"):
            data = gzip.compress(data)
        elif key.endswith(".zst"):
            data = zstandard.ZstdCompressor().compress(data)
        client.put_object(Bucket=bucket, Key=f"raw/{key}", Body=data)
    sink = io.BytesIO()
    pq.write_table(pa.table({"content": pa.array(parquet_texts, pa.string())}), sink, row_group_size=700)
    client.put_object(Bucket=bucket, Key="raw/reviews/d.parquet", Body=sink.getvalue())
    client.put_object(Bucket=bucket, Key="raw/reviews/e.jsonl.gz", Body=b"\x1f\x8b\x08\x00 not really gzip")
    client.put_object(Bucket=bucket, Key="raw/reviews/notes.txt", Body=b"not a corpus file: skipped")


def plain_ingest(files, parquet_texts):
    """The reference: one process, one loop, the rules applied in order, first copy kept."""
    rules = RuleSet(CleaningRules(**RULES))
    records = []  # (source, text, id) of good records in global order
    for key in ("news/a.jsonl.gz", "news/b.jsonl.zst", "reviews/c.jsonl"):
        for raw in files[key]:
            try:
                obj = json.loads(raw.decode("utf-8"))
            except ValueError:
                continue
            field = "text" if key.startswith("news") else "content"
            text = obj.get(field) if isinstance(obj, dict) else None
            if isinstance(text, str) and text.strip():
                source = key.split("/")[0]
                records.append((source, text, obj["id"] if source == "news" else record_id(source, text)))
    records += [("reviews", t, record_id("reviews", t)) for t in parquet_texts if t]
    kept, dropped, seen = [], Counter(), set()
    duplicates = 0
    for source, text, id_ in records:
        if reason := rules.first_failing_rule(text):
            dropped[reason] += 1
            continue
        key = normalize_text(text, "nfkc_lower_nospace")
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append({"id": id_, "text": text, "source": source})
    return kept, dropped, duplicates


@pytest.fixture(scope="module")
def corpus(s3_server):
    bucket = s3_server.new_bucket("ingest")
    files, parquet_texts = build_corpus()
    upload(s3_server, bucket, files, parquet_texts)
    return bucket, files, parquet_texts


def make_config(tmp_path, s3_server, bucket, out="runs/one"):
    data = {
        "run": {"name": "ingest-test", "output": f"s3://{bucket}/{out}"},
        "storage": {
            "endpoint_url": s3_server.endpoint,
            "secret_access_key": S3_SECRET_KEY,
            "access_key_id": S3_ACCESS_KEY,
        },
        "ingest": {
            "inputs": [
                {"uri": f"s3://{bucket}/raw/news/", "fields": {"text": "text", "id": "id"}},
                {"uri": f"s3://{bucket}/raw/reviews", "fields": {"text": "content"}},
            ],
            "rules": RULES,
            "dedup": {"num_partitions": 3},
        },
    }
    path = tmp_path / "ingest.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_ingest_from_s3_matches_plain_reference(corpus, s3_server, ray_local, tmp_path, caplog):
    bucket, files, parquet_texts = corpus
    cfg = make_config(tmp_path, s3_server, bucket)
    caplog.set_level(logging.INFO)
    manifest = ingest.main(cfg)
    counts = manifest["counts"]

    kept, dropped, duplicates = plain_ingest(files, parquet_texts)
    n_records = sum(len(v) for v in files.values()) + len(parquet_texts) + PLANTED_BAD["unreadable_file"]
    assert n_records >= 10_000
    assert counts["read"] == n_records
    assert counts["quarantined"] == PLANTED_BAD
    assert counts["dropped"] == dict(dropped)
    assert dropped["blocklisted"] == 2
    assert counts["duplicates"] == duplicates >= 60 + 30 + 20
    assert counts["kept"] == len(kept)
    # The invariant the stage checks itself, checked again here.
    assert counts["read"] == counts["kept"] + sum(counts["dropped"].values()) + counts["duplicates"] + sum(
        counts["quarantined"].values()
    )

    out = storage.resolve(cfg.stage_output("ingest"), cfg.storage)
    data = read_table(out, [f["path"] for f in manifest["files"]["data"]])
    assert data.column_names == ["id", "text", "source"]
    got = sorted(data.to_pylist(), key=lambda r: r["id"])
    assert got == sorted(kept, key=lambda r: r["id"])  # every kept text byte-identical to its source
    assert sum(f["rows"] for f in manifest["files"]["data"]) == len(kept)

    quarantine = read_table(out, [f["path"] for f in manifest["files"]["quarantine"]]).to_pylist()
    assert Counter(r["reason"] for r in quarantine) == Counter(PLANTED_BAD)
    utf8 = [r for r in quarantine if r["reason"] == "invalid_utf8"]
    assert utf8[0]["raw"] == b'{"content": "bad \xff\xfe bytes \xe5\xa5"}'
    assert all(r["path"].startswith(f"s3://{bucket}/raw/reviews/") and r["row"] > 0 for r in quarantine)
    assert {r["path"].rsplit("/", 1)[1] for r in quarantine} == {"c.jsonl", "d.parquet", "e.jsonl.gz"}

    dropped_rows = read_table(out, [f["path"] for f in manifest["files"]["dropped"]])
    assert Counter(dropped_rows.column("reason").to_pylist()) == dropped

    assert {i["uri"].rsplit("/", 1)[1] for i in manifest["inputs"]} == {
        "a.jsonl.gz",
        "b.jsonl.zst",
        "c.jsonl",
        "d.parquet",
        "e.jsonl.gz",
    }  # notes.txt is not a corpus file
    assert manifest["status"] == "complete" and manifest["package_version"]
    assert manifest["config_hash"] == cfg.hash("ingest")

    # Rerunning on a complete output does nothing and says so.
    before = sorted(f.path for f in out.fs.get_file_info(pa.fs.FileSelector(out.path, recursive=True)))
    caplog.clear()
    again = ingest.main(cfg)
    assert again == manifest
    assert "already complete" in caplog.text and "nothing to do" in caplog.text
    after = sorted(f.path for f in out.fs.get_file_info(pa.fs.FileSelector(out.path, recursive=True)))
    assert after == before

    # Credentials appear in no output object and no log line.
    for info in out.fs.get_file_info(pa.fs.FileSelector(out.path, recursive=True)):
        if info.type == pa.fs.FileType.File:
            body = storage.read_bytes(storage.Location(out.fs, info.path, info.path))
            assert S3_SECRET_KEY.encode() not in body and S3_ACCESS_KEY.encode() not in body, info.path
    assert S3_SECRET_KEY not in caplog.text and S3_ACCESS_KEY not in caplog.text


def test_dedup_off_keeps_copies_and_config_change_is_a_conflict(corpus, s3_server, ray_local, tmp_path):
    bucket, files, parquet_texts = corpus
    cfg = make_config(tmp_path, s3_server, bucket, out="runs/nodedup")
    cfg.ingest.dedup.enabled = False
    counts = ingest.main(cfg)["counts"]
    kept, _, duplicates = plain_ingest(files, parquet_texts)
    assert counts["duplicates"] == 0
    assert counts["kept"] == len(kept) + duplicates
    cfg.ingest.rules.min_chars = 30
    with pytest.raises(storage.OutputConflict, match="another config"):
        ingest.setup(cfg)


def test_blocks_read_out_of_order_and_retried_still_keep_the_first_copies(
    corpus, s3_server, ray_local, tmp_path
):
    """The stage's steps run by hand with the files in reverse order, so later copies claim their
    texts first and are displaced, and with the first file read twice (a retried task), each step
    as the stage runs it: the output is still the plain reference's."""
    bucket, files, parquet_texts = corpus
    plan = ingest.setup(make_config(tmp_path, s3_server, bucket, out="runs/reversed"))
    mode = plan.cfg.dedup.normalize
    claims = [KeyClaims.remote() for _ in range(2)]
    results = {}  # file -> what it became, the last attempt's (as Ray Data keeps one attempt's rows)

    def read(index: int) -> None:
        batch = pa.table({"file": [index]})
        for row in ingest.read_and_clean(batch, plan.files, 1000, plan.cfg.rules, mode, claims, plan.out):
            results[row["file"][0].as_py()] = json.loads(row["result"][0].as_py())

    for index in reversed(range(len(plan.files))):
        read(index)
    displaced = Displaced.concat(ray_local.get([c.all_displaced.remote() for c in claims]))
    assert len(displaced.shard) >= 60  # the news copies in reviews came first
    read(len(plan.files) - 1)  # retried after its copies were displaced: it writes them no more
    rewrites = ingest.drop_displaced(displaced, 3, plan.out, mode)
    counts, written = ingest.summarize(list(results.values()), rewrites)

    kept, _, duplicates = plain_ingest(files, parquet_texts)
    assert counts["duplicates"] == duplicates and counts["kept"] == len(kept)
    data = read_table(plan.out, [f["path"] for f in written["data"]])
    assert sorted(data.to_pylist(), key=lambda r: r["id"]) == sorted(kept, key=lambda r: r["id"])
    on_disk = {f.path.rsplit("/", 1)[1] for f in storage.list_files(plan.out.child("data"))}
    assert on_disk == {f["path"].rsplit("/", 1)[1] for f in written["data"]}  # nothing stale left
