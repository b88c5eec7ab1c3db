"""The pretrain (and finetune) stages' driver side, without Ray: config errors name their key and fail
before any Ray work; the config hash ignores the test hooks; the tokenizer is found and read once."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chuxin_ray import demo
from chuxin_ray.config import ConfigError, validate_config
from chuxin_ray.models.tiny import build_tiny_masked_lm, tiny_xlmr_config
from chuxin_ray.stages import pretrain

TEXTS = ["人民日报社论今天发表", "中国经济稳定增长", "北京的天气很好", "hello worldwide readers"] * 20


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-setup")
    tok_dir = demo.train_tokenizer(TEXTS, root / "tokenizer", vocab_size=200)
    (root / "run" / "tokenize" / "data").mkdir(parents=True)
    table = pa.table(
        {"input_ids": pa.array([[0, 5, 6, 2]], pa.list_(pa.int32())), "length": pa.array([4], pa.int32())}
    )
    pq.write_table(table, root / "run" / "tokenize" / "data" / "a.parquet")
    manifest = {
        "status": "complete",
        "config": {"tokenizer": str(tok_dir)},
        "files": {"data": [{"path": "data/a.parquet", "rows": 1}]},
    }
    (root / "run" / "tokenize" / "_manifest.json").write_text(json.dumps(manifest))
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    build_tiny_masked_lm(tiny_xlmr_config(vocab, max_position=66)).save_pretrained(root / "model")
    return root


def config(root, **pretrain):
    training = {"steps": 4, **pretrain.pop("training", {})}
    section = {"model": str(root / "model"), "max_length": 64, **pretrain, "training": training}
    return validate_config({"run": {"name": "t", "output": str(root / "run")}, "pretrain": section})


@pytest.mark.parametrize(
    ("training", "match"),
    [
        ({"strategy": "zero3"}, r"pretrain\.training\.strategy: .*'ddp' or 'fsdp'"),
        ({"stepz": 3}, r"pretrain\.training\.stepz: unknown key \(did you mean `steps`\?\)"),
        ({"strategy": "fsdp"}, r"strategy fsdp needs workers >= 2"),
        ({"cpus_per_worker": 0}, r"pretrain\.training\.cpus_per_worker: .*greater than 0"),
    ],
)
def test_bad_training_keys_name_the_key(workdir, training, match):
    with pytest.raises(ConfigError, match=match):
        config(workdir, training=training)


def test_setup_reads_tokenizer_from_the_input_manifest_and_checks_the_model(workdir):
    plan = pretrain.setup(config(workdir))
    assert plan.tokenizer_source == str(workdir / "tokenizer") and plan.shards[0].endswith("a.parquet")
    info = plan.info
    assert info.pad_id == 1 and info.mask_id == info.vocab_size - 1 and {0, 1, 2, 3} <= set(info.special_ids)
    assert info.word_start is not None and not info.word_start.all()  # `##` pieces of "worldwide readers"

    with pytest.raises(ConfigError, match=r"pretrain\.max_length=128: .* has 64 positions"):
        pretrain.setup(config(workdir, max_length=128))
    with pytest.raises(ConfigError, match=r"pretrain\.model: cannot read the config of '.*nowhere'"):
        pretrain.setup(config(workdir, model=str(workdir / "nowhere")))
    assert pretrain.setup(config(workdir, model="tiny", max_length=512)).info is not None


def test_config_hash_ignores_test_hooks_only(workdir):
    base = pretrain.config_hash(config(workdir))
    hooks = {"stop_after_steps": 2, "fail_at_step": 1, "record_rows": True}
    assert pretrain.config_hash(config(workdir, training=hooks)) == base
    assert pretrain.config_hash(config(workdir, training={"lr": 1e-3})) != base


def test_finetune_setup_checks_the_model_against_both_lengths_and_the_tokenizer(workdir):
    """finetune and unified share pretrain's model check (models/fit.py): each length key is named."""
    from chuxin_ray.stages import finetune

    pairs = workdir / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "天气", "pos": ["北京的天气很好"], "neg": ["中国经济"]}) + "\n")

    def finetune_config(**section):
        section = {
            "model": str(workdir / "model"),
            "tokenizer": str(workdir / "tokenizer"),
            "training": {"steps": 2},
            **section,
        }
        run = {"name": "t", "output": str(workdir / "ft-run")}
        return validate_config({"run": run, "finetune": {"input": str(pairs), **section}})

    plan = finetune.setup(finetune_config(query_max_length=32, passage_max_length=64))
    assert plan.model_source == str(workdir / "model") and len(plan.files) == 1
    with pytest.raises(ConfigError, match=r"finetune\.passage_max_length=128: .* has 64 positions"):
        finetune.setup(finetune_config(query_max_length=32, passage_max_length=128))
    with pytest.raises(ConfigError, match=r"finetune\.query_max_length=65: .* has 64 positions"):
        finetune.setup(finetune_config(query_max_length=65, passage_max_length=64))
    with pytest.raises(ConfigError, match=r"finetune\.model: cannot read the config of '.*nowhere'"):
        finetune.setup(finetune_config(model=str(workdir / "nowhere")))
    small = workdir / "small-vocab-model"
    build_tiny_masked_lm(tiny_xlmr_config(50, max_position=66)).save_pretrained(small)
    with pytest.raises(ConfigError, match=r"finetune\.tokenizer: \d+ ids, more than the 50 of"):
        finetune.setup(finetune_config(model=str(small), query_max_length=32, passage_max_length=64))
