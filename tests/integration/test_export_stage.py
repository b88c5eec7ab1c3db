"""Stage `export` on a tiny M3 folder, on local disk and through the local S3 server: the folder and its
model card land at <run.output>/export, verification (our loader vs BGEM3FlagModel) is in the manifest, a
rerun does nothing, and a folder without a head file is refused before anything is written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from chuxin_ray import storage
from chuxin_ray.config import ConfigError, EncoderRuntime, validate_config
from chuxin_ray.models.encoder import Encoder
from chuxin_ray.models.m3_folder import META_FILE, SPARSE_FILE
from chuxin_ray.stages import export
from tests.integration.test_m3_folder import QUERY_INSTRUCTION, build_m3_folder

pytestmark = pytest.mark.integration

FP32 = EncoderRuntime(precision="fp32")
TEXTS = ["初心检索模型", "一段较长的中文文本，用来比较导出前后的向量。"]


@pytest.fixture(scope="module")
def m3_folder(tmp_path_factory):
    return build_m3_folder(tmp_path_factory.mktemp("export-src"))


def make_config(output: str, model: str | None, storage_keys: dict | None = None, **sections):
    data = {"run": {"name": "tiny-m3-run", "output": output}, "export": {"model": model}, **sections}
    if storage_keys:
        data["storage"] = storage_keys
    return validate_config(data)


def check_export(cfg, monkeypatch) -> tuple[dict, storage.Location]:
    manifest = export.main(cfg)
    out = storage.resolve(cfg.stage_output("export"), cfg.storage)
    assert storage.read_manifest(out) == manifest
    assert manifest["verify"]["max_abs_diff"]["dense"] <= 1e-5
    assert max(manifest["verify"]["max_abs_diff"].values()) <= export.VERIFY_TOL
    for name in [*manifest["files"]["model"], *manifest["files"]["card"]]:
        assert storage.exists(out.child(name)), name
    assert {"model.safetensors", "colbert_linear.pt", "sparse_linear.pt", "1_Pooling/config.json"} <= set(
        manifest["files"]["model"]
    )
    card = storage.read_bytes(out.child("README.md")).decode()
    assert "# tiny-m3-run" in card and QUERY_INSTRUCTION in card and "base_model: `tiny`" in card
    for library in ("BGEM3FlagModel", "FlagModel", "SentenceTransformer"):
        assert library in card
    meta = storage.read_json(out.child(META_FILE))
    assert meta["model_name"] == "tiny-m3-run" and meta["provenance"]["stage"] == "unified"

    # a rerun finds the output complete and does nothing
    def no_copy(*args, **kwargs):
        raise AssertionError("a complete export was copied again")

    monkeypatch.setattr(export, "copy_files", no_copy)
    assert export.main(cfg) == manifest
    return manifest, out


def test_export_local(m3_folder, tmp_path, monkeypatch):
    cfg = make_config(str(tmp_path / "run"), str(m3_folder))
    manifest, out = check_export(cfg, monkeypatch)
    assert manifest["inputs"] == [str(m3_folder)] and out.path == str(tmp_path / "run" / "export")
    assert manifest["query_instruction"] == QUERY_INSTRUCTION and manifest["colbert_dim"] == 32
    exported = Encoder(out.path, runtime=FP32, heads="require").encode(TEXTS, 64, want=("dense", "sparse"))
    source = Encoder(str(m3_folder), runtime=FP32).encode(TEXTS, 64, want=("dense", "sparse"))
    np.testing.assert_array_equal(exported.dense, source.dense)
    assert exported.sparse == source.sparse


def test_export_from_and_to_s3(m3_folder, s3_server, monkeypatch):
    bucket = s3_server.new_bucket("export")
    client = s3_server.client()
    for f in m3_folder.rglob("*"):
        if f.is_file():
            client.put_object(
                Bucket=bucket, Key=f"models/m3/{f.relative_to(m3_folder).as_posix()}", Body=f.read_bytes()
            )
    storage_keys = {"endpoint_url": s3_server.endpoint, "region": "us-east-1"}
    cfg = make_config(f"s3://{bucket}/run", f"s3://{bucket}/models/m3", storage_keys)
    manifest, out = check_export(cfg, monkeypatch)
    assert out.uri == f"s3://{bucket}/run/export" and manifest["inputs"] == [f"s3://{bucket}/models/m3"]
    # the Encoder reads an s3:// folder too
    exported = Encoder(out.uri, cfg.storage, FP32, heads="require").encode(TEXTS, 64)
    np.testing.assert_array_equal(
        exported.dense, Encoder(str(m3_folder), runtime=FP32).encode(TEXTS, 64).dense
    )


def test_a_folder_without_a_head_is_refused_before_writing(m3_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(m3_folder, broken)
    (broken / SPARSE_FILE).unlink()
    cfg = make_config(str(tmp_path / "run"), str(broken))
    with pytest.raises(ConfigError, match=f"{SPARSE_FILE}.*{broken}|{broken}.*{SPARSE_FILE}"):
        export.setup(cfg)
    with pytest.raises(ConfigError, match="nothing found"):
        export.setup(make_config(str(tmp_path / "run"), str(tmp_path / "missing")))
    assert not (tmp_path / "run").exists()


def test_default_model_and_instruction_come_from_the_training_stage(m3_folder, tmp_path):
    # no export.model: the unified stage's model/; no chuxin_ray.json: unified.query_instruction
    run = tmp_path / "run"
    shutil.copytree(m3_folder, run / "unified" / "model")
    (run / "unified" / "model" / META_FILE).unlink()
    unified = {"query_instruction": "查询：", "training": {"steps": 1}}
    cfg = make_config(str(run), None, unified=unified)
    cfg.export.verify = False
    manifest = export.main(cfg)
    assert manifest["inputs"] == [str(run / "unified" / "model")] and manifest["verify"] is None
    assert manifest["query_instruction"] == "查询："
    st_config = json.loads((run / "export" / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {"query": "查询："}
    assert "- not recorded" in (run / "export" / "README.md").read_text()
