"""RetroMAE pretraining on 2 Ray Train workers (gloo, CPU), reading token ids from the local S3 server.

The corpus is 192 rows: 186 People's Daily paragraphs, 3 empty texts (only <s></s>) and 3 rows longer
than pretrain.max_length. 2 workers x batch_size 4 x grad_accumulation 2 take 16 rows per optimizer step,
so the 12 steps are exactly one epoch: every row must be trained on exactly once, however the run was
interrupted. One scenario runs once for the module (each Ray Train start costs ~60 s on 2 cores): a
worker is killed, Ray Train restarts the workers from the last checkpoint, the run is stopped, and a
second run with the same name resumes it to the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from chuxin_ray import demo, storage
from chuxin_ray.config import ConfigError, validate_config
from chuxin_ray.stages import pretrain
from chuxin_ray.train import loop

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MAX_LENGTH = 64
ROWS = 192
ROWS_PER_STEP = 16  # 2 workers x batch_size 4 x grad_accumulation 2
STEPS = ROWS // ROWS_PER_STEP


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, s3_server):
    """Token-id Parquet + manifest and a tiny XLM-R, both on S3; returns (bucket, tokenizer dir)."""
    from transformers import AutoTokenizer

    from chuxin_ray.models.tiny import build_tiny_masked_lm, tiny_xlmr_config

    root = tmp_path_factory.mktemp("pretrain")
    texts = demo.people_daily()[:2000]
    tok_dir = demo.train_tokenizer(texts, root / "tokenizer", vocab_size=2000)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    paragraphs = [t for t in texts if 20 <= len(t) <= 60][: ROWS - 6]
    long_text = "".join(texts[:40])  # ~4,000 characters: far over MAX_LENGTH tokens
    rows = [(f"pd-{i}", t) for i, t in enumerate(paragraphs)]
    rows += [(f"empty-{i}", "") for i in range(3)] + [(f"long-{i}", long_text[i:]) for i in range(3)]
    ids = [tok(text)["input_ids"] for _, text in rows]
    assert sum(len(x) > MAX_LENGTH for x in ids) == 3 and sum(len(x) == 2 for x in ids) == 3

    bucket = s3_server.new_bucket("pretrain")
    fs = storage.resolve(f"s3://{bucket}", s3_server.storage_config()).fs
    files = []
    assert len(rows) == ROWS
    for part in range(4):  # 4 shards: Ray Data has several blocks to split
        table = pa.table(
            {
                "id": [r[0] for r in rows[part::4]],
                "window": pa.array([0] * len(rows[part::4]), pa.int32()),
                "input_ids": pa.array(ids[part::4], pa.list_(pa.int32())),
                "length": pa.array([len(x) for x in ids[part::4]], pa.int32()),
            }
        )
        with fs.open_output_stream(f"{bucket}/tokens/data/part-{part}.parquet") as f:
            pq.write_table(table, f)
        files.append({"path": f"data/part-{part}.parquet", "rows": table.num_rows})
    manifest = {
        "stage": "tokenize",
        "status": "complete",
        "config": {"tokenizer": str(tok_dir)},
        "files": {"data": files},
    }
    with fs.open_output_stream(f"{bucket}/tokens/_manifest.json") as f:
        f.write(json.dumps(manifest).encode())

    model_dir = root / "tiny-xlmr"
    build_tiny_masked_lm(tiny_xlmr_config(len(tok), hidden=64, intermediate=128), seed=0).save_pretrained(
        model_dir
    )
    pafs.copy_files(
        str(model_dir),
        f"{bucket}/models/tiny-xlmr",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=fs,
    )
    return bucket, tok_dir, [r[0] for r in rows]


def make_config(s3_server, bucket: str, output: str, **training):
    return validate_config(
        {
            "run": {"name": "pt", "output": f"s3://{bucket}/{output}"},
            "storage": {"endpoint_url": s3_server.endpoint, "region": "us-east-1"},
            "pretrain": {
                "model": f"s3://{bucket}/models/tiny-xlmr",
                "input": f"s3://{bucket}/tokens",
                "max_length": MAX_LENGTH,
                "training": {
                    "workers": 2,
                    "cpus_per_worker": 0.5,  # 2 workers in 1 CPU of the 2-CPU test cluster, 1 left for Ray Data
                    "batch_size": 4,
                    "bucket_batches": 3,
                    "lr": 2e-3,
                    "warmup_ratio": 0.1,
                    "seed": 7,
                    **training,
                },
            },
        }
    )


def read_metrics(cfg) -> list[dict]:
    return loop.read_metrics(storage.resolve(cfg.stage_output("pretrain"), cfg.storage))


def download(cfg, sub: str, dest: Path) -> Path:
    loc = storage.resolve(cfg.stage_output("pretrain"), cfg.storage).child(sub)
    dest.mkdir(parents=True)
    pafs.copy_files(
        loc.path, str(dest), source_filesystem=loc.fs, destination_filesystem=pafs.LocalFileSystem()
    )
    return dest


@pytest.fixture(scope="module")
def resumed(corpus, s3_server, ray_local):
    """Run 1: checkpoints every 3 steps; its last worker is killed during step 5, Ray Train restarts the
    workers (session 2) from step 3, and the run stops after step 8, as if interrupted. Run 2, the same
    name without the hooks (session 3), resumes from the checkpoint at step 6 and ends at step 12."""
    bucket, _, _ = corpus
    common = {"steps": STEPS, "grad_accumulation": 2, "checkpoint_every": 3, "record_rows": True}
    cfg = make_config(
        s3_server, bucket, "resume", **common, fail_at_step=5, stop_after_steps=8, max_failures=1
    )
    stopped = pretrain.main(cfg)
    history_stopped = read_metrics(cfg)
    cfg = make_config(s3_server, bucket, "resume", **common)
    manifest = pretrain.main(cfg)
    return cfg, stopped, history_stopped, manifest


def test_killed_and_stopped_run_resumes_with_exact_data_position(resumed, corpus):
    cfg, stopped, history_stopped, manifest = resumed
    assert stopped["status"] == "stopped" and stopped["step"] == 8 and stopped["session"] == 2
    assert [(r["step"], r["session"]) for r in history_stopped] == [
        (s, 1 if s <= 3 else 2) for s in range(1, 9)
    ]

    assert manifest["status"] == "complete" and manifest["counts"]["steps"] == STEPS
    history = read_metrics(cfg)
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    assert [r["session"] for r in history] == [1] * 3 + [2] * 3 + [3] * 6
    assert [r["resumed_from"] for r in history] == [None] * 3 + [3] * 3 + [6] * 6
    # Steps 7-8 ran twice (session 2, then session 3 from the step-6 checkpoint) on the same data and
    # masks: the same rows, and the same losses up to reduction order.
    for before, after in zip(history_stopped[6:8], history[6:8], strict=True):
        assert before["rows"] == after["rows"] and before["loss"] == pytest.approx(after["loss"], rel=1e-4)
    # 12 steps x 16 rows = one epoch: every row exactly once, none repeated, none skipped.
    trained = [key.split("#")[0] for r in history for key in r["rows"]]
    assert sorted(trained) == sorted(corpus[2])
    assert all(r["epoch"] == 0 and r["samples"] == ROWS_PER_STEP for r in history[:-1])


def test_loss_falls_and_encoder_model_loads(resumed, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    cfg, _, _, manifest = resumed
    history = read_metrics(cfg)
    first = sum(r["loss"] for r in history[:3]) / 3
    last = sum(r["loss"] for r in history[-3:]) / 3
    assert last < first - 0.5, (first, last)
    for r in history:
        assert abs(r["loss"] - (r["encoder_loss"] + r["decoder_loss"])) < 1e-4
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and 0 <= r["padding"] < 1
    assert history[0]["lr"] == 0.0 and max(r["lr"] for r in history) == pytest.approx(2e-3)  # warmup from 0

    encoder_dir = download(cfg, "encoder_model", tmp_path / "encoder_model")
    encoder = AutoModel.from_pretrained(encoder_dir).eval()
    tok = AutoTokenizer.from_pretrained(encoder_dir)
    batch = tok(["今天天气很好", "人民日报社论"], padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = encoder(**batch).last_hidden_state[:, 0]  # (2, H)
    assert cls.shape == (2, 64) and torch.isfinite(cls).all()

    # The whole RetroMAE comes back, encoder and trained decoder.
    model = pretrain.load_output(cfg.stage_output("pretrain"), cfg.storage)
    assert torch.equal(
        model.lm.roberta.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight
    )
    assert set(manifest["files"]) == {"encoder_model", "retromae", "metrics"}


def test_rerun_on_complete_output_does_nothing(resumed):
    cfg, _, _, manifest = resumed
    assert pretrain.main(cfg)["finished_at"] == manifest["finished_at"]


def test_more_workers_than_the_cluster_fails_fast(corpus, s3_server, ray_local):
    bucket, _, _ = corpus
    cfg = make_config(s3_server, bucket, "too-big", steps=2, workers=4, cpus_per_worker=1)
    with pytest.raises(
        ConfigError, match=r"pretrain\.training\.workers=4 x pretrain\.training\.cpus_per_worker=1"
    ):
        pretrain.main(cfg)
    # Workers that fit but take every CPU would starve Ray Data's read tasks: also refused, with the fix.
    cfg = make_config(s3_server, bucket, "too-big", steps=2, workers=2, cpus_per_worker=1)
    with pytest.raises(ConfigError, match=r"Ray Data's read tasks.*fractions such as 0.5"):
        pretrain.main(cfg)
