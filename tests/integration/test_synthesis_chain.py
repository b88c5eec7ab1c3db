"""The whole synthesis chain on the local Ray and the local S3 server:

    200 People's Daily passages in S3 -> ingest -> synthesize (our Serve endpoint, a tiny random
    causal LM) -> judge (a deterministic external endpoint: FakeOpenAI) -> mine (a tiny encoder)
    -> score (a tiny reranker, loaded from S3) -> FlagEmbedding jsonl that FlagEmbedding's own
    training dataset loads, with a funnel in every manifest.

Plus: the reranker scores exactly as FlagEmbedding's FlagReranker.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from chuxin_ray import demo, storage
from chuxin_ray.config import EncoderRuntime, load_config
from chuxin_ray.llm.tiny import build_tiny_causal_lm
from chuxin_ray.models.tiny import tiny_xlmr_config
from chuxin_ray.stages import ingest, judge, mine, score, synthesize
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.integration.test_llm_faults import FakeOpenAI
from tests.integration.test_serve import free_port

pytestmark = pytest.mark.integration

N_PASSAGES = 200
VERDICTS = ["是", "否", '{"answer": "yes", "reason": "像真实搜索"}', "这个不好说"]  # yes, no, yes, unknown


def judge_answer(content: str) -> str:
    query = content.split("查询：", 1)[1].split("\n", 1)[0]
    return VERDICTS[zlib.crc32(query.encode()) % 4]


def build_models(root: Path) -> dict[str, Path]:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    texts = demo.people_daily()[:1000]
    tok_dir = demo.train_tokenizer(texts, root / "tokenizer", vocab_size=1000)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    # XLM-R's tokenizer returns no token_type_ids (one segment type); the demo tokenizer would give
    # the second text of a pair type 1, which a type_vocab_size=1 model cannot embed.
    tok.model_input_names = tok.init_kwargs["model_input_names"] = ["input_ids", "attention_mask"]  # saved
    paths = {"lm": build_tiny_causal_lm(tok_dir, root / "lm")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = tiny_xlmr_config(vocab_size=len(tok), dropout=0.0, initializer_range=0.5)
        encoder = AutoModel.from_config(config)
        reranker = AutoModelForSequenceClassification.from_config(
            tiny_xlmr_config(vocab_size=len(tok), dropout=0.0, initializer_range=0.5, num_labels=1)
        )
    for name, model in (("encoder", encoder), ("reranker", reranker)):
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("models"))


def test_reranker_scores_as_flagreranker(models):
    from FlagEmbedding import FlagReranker

    texts = demo.people_daily()[1000:1040]
    pairs = [(t[:15], texts[(i + 1) % len(texts)]) for i, t in enumerate(texts)]
    ours = score.Reranker(str(models["reranker"]), None, EncoderRuntime(batch_size=8), max_length=64).score(
        pairs
    )
    flag = FlagReranker(str(models["reranker"]), use_fp16=False, devices="cpu", max_length=64, batch_size=16)
    theirs = np.asarray(flag.compute_score(pairs), dtype=np.float32)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert ours.std() > 1e-3  # the scores differ: the comparison means something


def test_passages_in_s3_to_training_jsonl(models, s3_server, ray_local, tmp_path):
    from ray import serve

    from chuxin_ray.llm.service import deploy

    bucket = s3_server.new_bucket("chain")
    client = s3_server.client()
    lines = [
        json.dumps({"id": f"pd-{i}", "text": t}, ensure_ascii=False)
        for i, t in enumerate(demo.people_daily()[:N_PASSAGES])
    ]
    client.put_object(Bucket=bucket, Key="raw/news.jsonl", Body="\n".join(lines).encode())
    for f in models["reranker"].iterdir():  # the reranker is read from object storage
        client.put_object(Bucket=bucket, Key=f"models/reranker/{f.name}", Body=f.read_bytes())

    judge_server = FakeOpenAI(judge_answer)
    judge_url = judge_server.start()
    llm = {"concurrency": 8, "batch_size": 32, "timeout_s": 60, "max_retries": 2, "backoff_s": 0.05}
    data = {
        "run": {"name": "chain", "output": f"s3://{bucket}/run"},
        "storage": {
            "endpoint_url": s3_server.endpoint,
            "region": "us-east-1",
            "access_key_id": S3_ACCESS_KEY,
            "secret_access_key": S3_SECRET_KEY,
        },
        "serve": {
            "model": str(models["lm"]),
            "model_id": "tiny-qwen",
            "port": free_port(),
            "num_cpus": 0.5,
            "max_batch_size": 16,
        },
        # One dedup partition each: a few hundred rows; every partition is a shuffle actor to start.
        "ingest": {
            "inputs": [{"uri": f"s3://{bucket}/raw/news.jsonl", "fields": {"id": "id"}}],
            "dedup": {"num_partitions": 1},
        },
        "synthesize": {
            "queries_per_passage": 2,
            "shard_rows": 100,
            "max_passage_chars": 200,
            "llm": {**llm, "temperature": 1.0, "max_tokens": 8},
        },
        "judge": {
            "keep": "yes",
            "num_partitions": 1,
            "rules": {"min_chars": 2, "max_copy_ratio": 0.9},
            "llm": {**llm, "base_url": judge_url, "model": "external-judge"},
        },
        "mine": {
            "encoder": str(models["encoder"]),
            "query_max_length": 32,
            "passage_max_length": 64,
            "range_start": 3,
            "range_end": 60,
            "negative_number": 4,
            "runtime": {"batch_size": 32},
        },
        "score": {
            "reranker": f"s3://{bucket}/models/reranker",
            "max_length": 64,
            "mode": "relative",
            "neg_threshold": 1.0,  # drop negatives scored above the query's best positive
            "runtime": {"batch_size": 32},
        },
    }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    cfg = load_config(path)

    deploy(cfg, wait=False)
    try:
        manifests = {stage.STAGE: stage.main(cfg) for stage in (ingest, synthesize, judge, mine, score)}
    finally:
        serve.shutdown()
        judge_server.stop()

    # -- the funnel, carried stage to stage
    kept = manifests["ingest"]["counts"]["kept"]
    s = manifests["synthesize"]["counts"]["funnel"]
    assert s["passages_in"] == kept > 150
    assert s["passages_with_queries"] + s["unparsed_answers"] + sum(s["failed_calls"].values()) == kept
    assert s["queries_generated"] >= s["passages_with_queries"] > 0
    assert manifests["synthesize"]["counts"]["completion_tokens"] > 0

    j = manifests["judge"]["counts"]["funnel"]
    assert {k: j[k] for k in s} == s  # the upstream funnel is carried unchanged
    assert j["queries_judge_in"] == s["queries_generated"]
    assert (
        j["queries_kept"] + sum(j["rule_filtered"].values()) + sum(j["judged_out"].values())
        == j["queries_judge_in"]
    )
    assert set(j["judged"]) <= {"yes", "no", "unknown"} and j["judged"].get("no", 0) > 0
    assert set(j["judged_out"]) <= {"no", "unknown"} and j["queries_kept"] > 20

    m = manifests["mine"]["counts"]["funnel"]
    assert m["queries_mined"] == j["queries_kept"] and m["corpus_passages"] == kept
    assert m["negatives_mined"] == 4 * m["queries_mined"]

    f = manifests["score"]["counts"]["funnel"]
    for key in (
        "passages_in",
        "queries_generated",
        "failed_calls",
        "rule_filtered",
        "judged_out",
        "negatives_mined",
    ):
        assert key in f
    assert f["pairs_scored"] == m["queries_mined"] + m["negatives_mined"]
    assert f["pairs_dropped"]["negative_above_threshold"] > 0
    assert f["pairs_out"] + sum(f["pairs_dropped"].values()) == f["pairs_scored"]

    # -- the judge kept only clear yeses, and kept the raw answers
    judge_out = storage.resolve(cfg.stage_output("judge"), cfg.storage)
    from chuxin_ray.data.shards import read_table

    judged = read_table(judge_out, [x["path"] for x in manifests["judge"]["files"]["data"]]).to_pylist()
    assert {r["verdict"] for r in judged} == {"yes"}
    assert {r["judge_answer"] for r in judged} <= {VERDICTS[0], VERDICTS[2]}

    # -- the training data: FlagEmbedding's format, scores recorded, the rule applied
    out = storage.resolve(cfg.stage_output("score"), cfg.storage)
    local = tmp_path / "train"
    local.mkdir()
    rows = []
    for x in manifests["score"]["files"]["data"]:
        body = storage.read_bytes(out.child(x["path"]))
        (local / Path(x["path"]).name).write_bytes(body)
        rows += [json.loads(line) for line in body.decode().splitlines()]
    assert len(rows) == f["queries_out"] > 0
    for row in rows:
        assert isinstance(row["query"], str) and len(row["pos"]) == len(row["pos_scores"]) == 1
        assert 1 <= len(row["neg"]) == len(row["neg_scores"]) == len(row["neg_ids"]) <= 4
        assert row["pos_ids"][0] not in row["neg_ids"]
        assert max(row["neg_scores"]) <= row["pos_scores"][0] + 1e-6  # sigmoid is monotonic

    from FlagEmbedding.abc.finetune.embedder import AbsEmbedderDataArguments, AbsEmbedderTrainDataset
    from transformers import AutoTokenizer

    args = AbsEmbedderDataArguments(
        train_data=[str(local)],
        train_group_size=4,
        knowledge_distillation=True,
        cache_path=str(tmp_path / "hf"),
    )
    dataset = AbsEmbedderTrainDataset(args, AutoTokenizer.from_pretrained(str(models["encoder"])))
    assert len(dataset) == len(rows)
    query, passages, teacher = dataset[0]
    assert isinstance(query, str) and len(passages) == len(teacher) == 4

    # -- every stage is complete: a rerun of the chain does nothing
    assert synthesize.main(cfg)["finished_at"] == manifests["synthesize"]["finished_at"]
    assert score.main(cfg)["finished_at"] == manifests["score"]["finished_at"]
