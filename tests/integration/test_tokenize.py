"""Tokenize end to end on a local Ray: ingest output -> token ids, equal to direct tokenizer calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from chuxin_ray import demo, storage
from chuxin_ray.config import ConfigError, load_config
from chuxin_ray.data.shards import read_table
from chuxin_ray.stages import ingest, tokenize

pytestmark = pytest.mark.integration

XLMR = Path(__file__).resolve().parents[2].parent / "shared" / "xlmr-tokenizer"


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """A small real corpus ingested to local storage; returns the config file's data."""
    root = tmp_path_factory.mktemp("tok")
    raw = root / "raw.jsonl"
    texts = demo.people_daily()[:600] + demo.reviews()[:200]
    raw.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts), encoding="utf-8")
    tok_dir = demo.train_tokenizer(texts, root / "tokenizer", vocab_size=1500)
    data = {
        "run": {"name": "tok", "output": str(root / "run")},
        "ingest": {"inputs": [{"uri": str(raw)}]},
        "tokenize": {
            "tokenizer": str(tok_dir),
            "max_length": 64,
            "long_texts": "window",
            "stride": 8,
            "batch_size": 100,
        },
    }
    return root, data


def config(root: Path, data: dict, *overrides: str):
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, list(overrides))


def read_output(cfg) -> tuple[dict, list[dict]]:
    out = storage.resolve(cfg.stage_output("tokenize"))
    manifest = storage.read_manifest(out)
    return manifest, read_table(out, [f["path"] for f in manifest["files"]["data"]]).to_pylist()


def test_windows_cover_every_text_exactly(ingested, ray_local):
    from transformers import AutoTokenizer

    root, data = ingested
    cfg = config(root, data)
    kept = ingest.main(cfg)
    tokenize.main(cfg)
    manifest, rows = read_output(cfg)
    texts = {
        r["id"]: r["text"]
        for r in read_table(
            storage.resolve(cfg.stage_output("ingest")), [f["path"] for f in kept["files"]["data"]]
        ).to_pylist()
    }
    assert manifest["counts"]["texts"] == len(texts) == kept["counts"]["kept"]
    assert manifest["counts"]["rows"] == len(rows) > len(texts)  # long paragraphs became several windows

    tok = AutoTokenizer.from_pretrained(data["tokenize"]["tokenizer"])
    by_id: dict[str, list] = {}
    for r in rows:
        assert r["length"] == len(r["input_ids"]) <= 64
        assert r["input_ids"][0] == tok.cls_token_id and r["input_ids"][-1] == tok.sep_token_id
        by_id.setdefault(r["id"], []).append(r)
    assert set(by_id) == set(texts)
    for id_, windows in by_id.items():
        windows.sort(key=lambda r: r["window"])
        assert [w["window"] for w in windows] == list(range(len(windows)))
        full = tok(texts[id_], add_special_tokens=False)["input_ids"]
        # Window k holds content tokens [k*step, k*step + 62) with step = 62 - stride.
        step = 62 - 8
        for k, w in enumerate(windows):
            assert w["input_ids"][1:-1] == full[k * step : k * step + 62]
        assert (len(windows) - 1) * step < len(full) <= (len(windows) - 1) * step + 62


def test_truncate_mode_with_the_real_xlmr_tokenizer(ingested, ray_local):
    from transformers import AutoTokenizer

    if not XLMR.exists():
        pytest.skip(f"{XLMR} not present (it ships in ../shared)")
    root, data = ingested
    cfg = config(
        root,
        data,
        f"tokenize.tokenizer={XLMR}",
        "tokenize.long_texts=truncate",
        "tokenize.output=" + str(root / "run" / "tok-xlmr"),
    )
    ingest.main(cfg)  # complete already: nothing to do
    tokenize.main(cfg)
    manifest, rows = read_output(cfg)
    texts = {
        r["id"]: r["text"]
        for r in read_table(
            storage.resolve(cfg.stage_output("ingest")),
            [
                f["path"]
                for f in storage.read_manifest(storage.resolve(cfg.stage_output("ingest")))["files"]["data"]
            ],
        ).to_pylist()
    }
    assert len(rows) == len(texts) and all(r["window"] == 0 for r in rows)
    tok = AutoTokenizer.from_pretrained(str(XLMR))
    expected = tok([texts[r["id"]] for r in rows], truncation=True, max_length=64)["input_ids"]
    assert [r["input_ids"] for r in rows] == expected
    assert manifest["counts"]["over_max_length"] == sum(
        len(tok(t, add_special_tokens=False)["input_ids"]) > 62 for t in texts.values()
    )
    assert max(int(k) for k in manifest["counts"]["length_histogram"]) == 64


def test_tokenize_without_input_fails_before_ray(tmp_path):
    data = {"run": {"name": "t", "output": str(tmp_path / "run")}, "tokenize": {"tokenizer": "x"}}
    with pytest.raises(ConfigError, match=r"tokenize\.input: no Parquet files .* run `ingest` first"):
        tokenize.setup(config(tmp_path, data))
