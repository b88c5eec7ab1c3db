"""URIs of each kind, atomic writes, manifests and stage output states."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from chuxin_ray import storage
from chuxin_ray.config import StorageConfig


def test_plain_and_file_uris_are_local(tmp_path):
    plain = storage.resolve(str(tmp_path / "a"))
    assert isinstance(plain.fs, pafs.LocalFileSystem) and plain.path == str(tmp_path / "a")
    file_uri = storage.resolve(f"file://{tmp_path}/a")
    assert file_uri.path == str(tmp_path / "a") and file_uri.uri == f"file://{tmp_path}/a"
    rel = storage.resolve("runs/x")
    assert rel.path == os.path.abspath("runs/x")


def test_s3_uri_with_endpoint_from_config_and_env(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    loc = storage.resolve(
        "s3://my-bucket/some/prefix/", StorageConfig(endpoint_url="http://127.0.0.1:9", region="eu-west-1")
    )
    assert isinstance(loc.fs, pafs.S3FileSystem)
    assert loc.path == "my-bucket/some/prefix" and loc.uri == "s3://my-bucket/some/prefix"
    assert loc.fs.region == "eu-west-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    monkeypatch.setenv("AWS_REGION", "ap-east-1")
    assert storage.resolve("s3://my-bucket/x").fs.region == "ap-east-1"


def test_gs_uri():
    loc = storage.resolve("gs://my-bucket/p", StorageConfig(anonymous=True))
    assert isinstance(loc.fs, pafs.GcsFileSystem) and loc.path == "my-bucket/p"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://host/x", "unsupported URI scheme 'ftp'"),
        ("s3://ab/x", "at least 3 characters"),
        ("s3://AKIA:supersecret@bucket/x", "credentials in a URI are not allowed"),
    ],
)
def test_bad_uris(uri, message):
    with pytest.raises(storage.StorageError, match=message) as e:
        storage.resolve(uri)
    assert "supersecret" not in str(e.value)


def test_child_and_uri_of(tmp_path):
    loc = storage.resolve(str(tmp_path))
    child = loc.child("a", "/b/")
    assert child.path == f"{tmp_path}/a/b" and child.uri == f"{tmp_path}/a/b"
    assert loc.uri_of(f"{tmp_path}/a/c.jsonl") == f"{tmp_path}/a/c.jsonl"


def test_atomic_local_write_leaves_no_temporaries(tmp_path):
    loc = storage.resolve(str(tmp_path / "deep" / "f.bin"))
    storage.write_bytes(loc, b"one")
    storage.write_bytes(loc, b"two")
    assert storage.read_bytes(loc) == b"two"
    assert os.listdir(tmp_path / "deep") == ["f.bin"]


def test_list_files_skips_hidden_and_underscore(tmp_path):
    for name in ("a.jsonl", "sub/b.parquet", "_manifest.json", ".tmp-x", "_staging/c.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    found = [os.path.relpath(f.path, tmp_path) for f in storage.list_files(storage.resolve(str(tmp_path)))]
    assert found == ["a.jsonl", "sub/b.parquet"]
    with pytest.raises(storage.StorageError, match="nothing found"):
        storage.list_files(storage.resolve(str(tmp_path / "missing")))


def test_stage_output_states(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    assert storage.begin_stage("s", out, "h1", False, ("data",)) is None
    storage.write_bytes(out.child("data/part-1.parquet"), b"x")  # a failed attempt's leftovers
    assert storage.begin_stage("s", out, "h1", False, ("data",)) is None
    assert not storage.exists(out.child("data"))
    storage.write_manifest(out, {"status": "complete", "config_hash": "h1"})
    assert storage.begin_stage("s", out, "h1", False, ("data",))["config_hash"] == "h1"
    with pytest.raises(storage.OutputConflict, match="--force"):
        storage.begin_stage("s", out, "h2", False, ("data",))
    assert storage.begin_stage("s", out, "h2", True, ("data",)) is None
    assert storage.read_manifest(out) is None


@pytest.mark.integration
def test_s3_round_trip_over_http(s3_server):
    bucket = s3_server.new_bucket()
    loc = storage.resolve(f"s3://{bucket}/a/b.json", s3_server.storage_config())
    storage.write_json(loc, {"k": "值"})
    assert storage.read_json(loc) == {"k": "值"}
    assert storage.exists(loc)
    listed = storage.list_files(storage.resolve(f"s3://{bucket}/a", s3_server.storage_config()))
    assert [f.path for f in listed] == [f"{bucket}/a/b.json"]
    body = s3_server.client().get_object(Bucket=bucket, Key="a/b.json")["Body"].read()
    assert b"\xe5\x80\xbc" in body  # boto3 sees what pyarrow wrote
