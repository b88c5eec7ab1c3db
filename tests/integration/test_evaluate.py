"""Retrieval evaluation on the local Ray with tiny models: the stage's metrics equal brute force (every
query against every passage, scored in numpy from the encoder's own outputs, the runs scored by
pytrec_eval) for every method, with the set read from S3 and the corpus in 5 shards; one shard gives what
5 give; a dense-only folder is evaluated beside a baseline; a complete output is not redone; wrong
folders and sets fail before any Ray work."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import pytrec_eval
import torch
import yaml

from chuxin_ray import demo, storage
from chuxin_ray.config import ConfigError, EncoderRuntime, load_config
from chuxin_ray.models.encoder import Encoder
from chuxin_ray.models.m3 import M3Embedder, M3Heads, special_token_ids
from chuxin_ray.models.m3_folder import save_m3_folder
from chuxin_ray.models.tiny import tiny_xlmr_config
from chuxin_ray.retrieval.io import load_beir
from chuxin_ray.stages import evaluate

pytestmark = pytest.mark.integration

PASSAGES, QUERIES = 200, 40
INSTRUCTION = "查询："
TOP_K = 20
WEIGHTS = (0.4, 0.2, 0.4)
METHODS = ["dense", "sparse", "colbert", "hybrid"]
# ours -> pytrec_eval's name; mrr_at_10 is recip_rank on rankings cut to 10 (trec_eval has no cutoff for it)
TREC = {
    "ndcg_at_1": "ndcg_cut_1",
    "ndcg_at_3": "ndcg_cut_3",
    "ndcg_at_5": "ndcg_cut_5",
    "ndcg_at_10": "ndcg_cut_10",
    "recall_at_10": "recall_10",
    "recall_at_100": "recall_100",
    "map_at_10": "map_cut_10",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from transformers import AutoModel, AutoTokenizer

    root = tmp_path_factory.mktemp("evaluate")
    eval_set = demo.write_eval_set(root / "set", passages=PASSAGES, queries=QUERIES)
    texts = [d["text"] for d in load_beir(eval_set).corpus.values()]
    tok = AutoTokenizer.from_pretrained(str(demo.train_tokenizer(texts, root / "tokenizer", vocab_size=800)))
    # One layer at initializer_range 0.5: at XLM-R's 0.02 a tiny random encoder maps every text to nearly
    # one vector (near-ties within float rounding); so every method finds some relevant passages.
    config = tiny_xlmr_config(vocab_size=len(tok), hidden=32, layers=1, dropout=0.0, initializer_range=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m3 = M3Embedder(AutoModel.from_config(config), M3Heads(32, zeroed_token_ids=special_token_ids(tok)))
        plain = AutoModel.from_config(config)
    save_m3_folder(m3, tok, root / "m3")
    plain.save_pretrained(str(root / "plain"))
    tok.save_pretrained(str(root / "plain"))
    return root, eval_set


def make_config(root, name, set_uri, model, **keys):
    section = {
        "model": str(model),
        "sets": [{"name": "pd", "uri": str(set_uri), "query_instruction": INSTRUCTION}],
        "methods": METHODS,
        "hybrid_weights": list(WEIGHTS),
        "query_max_length": 32,
        "passage_max_length": 96,
        "top_k": TOP_K,
        "corpus_shard_rows": 45,  # 200 passages: 5 shards, the last one short
        "runtime": {"batch_size": 16},
        **keys,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "ev", "output": str(root / name)}, "evaluate": section}))
    return load_config(path)


def read_results(cfg) -> tuple[dict, dict, storage.Location]:
    out = storage.resolve(cfg.stage_output("evaluate"))
    return storage.read_json(out.child("results.json")), storage.read_manifest(out), out


# --------------------------------------------------------------------------------------------------
# The reference: every pair scored in numpy, pytrec_eval on the runs
# --------------------------------------------------------------------------------------------------


def brute_force(folder, eval_set, methods) -> dict[str, dict[str, float]]:
    data = load_beir(eval_set)
    doc_ids = list(data.corpus)
    passages = [f"{d['title']} {d['text']}".strip() for d in data.corpus.values()]  # mteb's corpus text
    query_ids = [q for q in data.queries if data.qrels.get(q)]
    queries = [data.queries[q] for q in query_ids]
    enc = Encoder(str(folder), runtime=EncoderRuntime(batch_size=64))
    heads = ["sparse", "colbert"] if set(methods) != {"dense"} else []
    q = enc.encode(queries, 32, instruction=INSTRUCTION, want=["dense", *heads])
    p = enc.encode(passages, 96, want=["dense", *heads])
    scores = {"dense": q.dense.astype(np.float64) @ p.dense.astype(np.float64).T}  # (Q, N)
    if heads:
        scores["sparse"] = np.array(
            [[sum(w * wp.get(t, 0.0) for t, w in wq.items()) for wp in p.sparse] for wq in q.sparse]
        )  # (Q, N)
        scores["colbert"] = np.array(
            [[(qv.astype(np.float64) @ pv.T).max(axis=1).mean() for pv in p.colbert] for qv in q.colbert]
        )  # (Q, N)
    if "hybrid" in methods:
        w = WEIGHTS
        scores["hybrid"] = (
            w[0] * scores["dense"] + w[1] * scores["sparse"] + w[2] * scores["colbert"]
        ) / sum(w)
    ranked = {m: np.argsort(-s, axis=1, kind="stable")[:, :TOP_K] for m, s in scores.items()}  # (Q, k)
    out = {}
    for method in methods:
        run = {
            qid: {doc_ids[j]: float(scores[method][i, j]) for j in ranked[method][i]}
            for i, qid in enumerate(query_ids)
        }
        evaluator = pytrec_eval.RelevanceEvaluator(
            data.qrels, {"ndcg_cut.1,3,5,10", "recall.10,100", "map_cut.10"}
        )
        per_query = evaluator.evaluate(run)
        cut = {
            qid: dict(sorted(r.items(), key=lambda x: (x[1], x[0]), reverse=True)[:10])
            for qid, r in run.items()
        }
        rr = pytrec_eval.RelevanceEvaluator(data.qrels, {"recip_rank"}).evaluate(cut)
        out[method] = {
            ours: np.mean([m[theirs] for m in per_query.values()]) for ours, theirs in TREC.items()
        }
        out[method]["mrr_at_10"] = np.mean([m["recip_rank"] for m in rr.values()])
    return out


def assert_metrics_equal(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for method, metrics in theirs.items():
        assert set(ours[method]) == set(metrics), method
        for key, value in metrics.items():
            assert ours[method][key] == pytest.approx(value, abs=1e-6), (method, key)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def m3_run(data, s3_server, ray_local):
    """Every method of the M3 folder on the set read from S3, the corpus in 5 shards."""
    root, eval_set = data
    bucket = s3_server.new_bucket("evalset")
    client = s3_server.client()
    for f in sorted(eval_set.rglob("*")):
        if f.is_file():
            client.put_object(Bucket=bucket, Key=f"sets/pd/{f.relative_to(eval_set)}", Body=f.read_bytes())
    cfg = make_config(root, "m3", f"s3://{bucket}/sets/pd", root / "m3")
    cfg.storage = s3_server.storage_config()
    evaluate.main(cfg)
    return cfg


def test_every_method_equals_brute_force(data, m3_run):
    root, eval_set = data
    results, manifest, out = read_results(m3_run)
    assert list(results) == ["pd"] and list(results["pd"]) == ["model"]
    assert_metrics_equal(results["pd"]["model"], brute_force(root / "m3", eval_set, METHODS))
    main = [results["pd"]["model"][m]["ndcg_at_10"] for m in METHODS]
    assert min(main) > 0 and len(set(main)) == len(METHODS)  # four rankings, none without hits

    # runs: top_k per query, best first, ranks 1..k; the manifest lists them and the main scores
    for method in METHODS:
        lines = storage.read_bytes(out.child(f"runs/pd/model-{method}.jsonl")).decode().splitlines()
        rows = [json.loads(line) for line in lines]
        assert len(rows) == QUERIES * TOP_K
        first = [r for r in rows if r["query_id"] == "q0"]
        assert [r["rank"] for r in first] == list(range(1, TOP_K + 1))
        assert [r["score"] for r in first] == sorted((r["score"] for r in first), reverse=True)
    assert manifest["files"]["runs"] == [f"runs/pd/model-{m}.jsonl" for m in METHODS]
    assert manifest["counts"]["main"]["pd"]["model"] == {
        m: results["pd"]["model"][m]["ndcg_at_10"] for m in METHODS
    }
    assert manifest["counts"]["sets"]["pd"]["scored"] == QUERIES
    assert "| pd | hybrid | ndcg_at_10 |" in storage.read_bytes(out.child("results.md")).decode()

    # complete: a rerun does nothing
    assert evaluate.main(m3_run)["finished_at"] == manifest["finished_at"]


def test_one_local_shard_gives_what_five_shards_from_s3_give(data, m3_run, ray_local):
    root, eval_set = data
    cfg = make_config(root, "one-shard", eval_set, root / "m3", corpus_shard_rows=1000)
    evaluate.main(cfg)
    one_shard, _, _ = read_results(cfg)
    five_shards, _, _ = read_results(m3_run)
    assert_metrics_equal(one_shard["pd"]["model"], five_shards["pd"]["model"])


def test_dense_only_model_beside_a_baseline(data, m3_run, ray_local):
    """A plain AutoModel folder (dense only), the M3 folder as its baseline."""
    root, eval_set = data
    cfg = make_config(root, "plain", eval_set, root / "plain", baseline=str(root / "m3"), methods=["dense"])
    evaluate.main(cfg)
    results, manifest, out = read_results(cfg)
    assert_metrics_equal(results["pd"]["model"], brute_force(root / "plain", eval_set, ["dense"]))
    m3_results, _, _ = read_results(m3_run)
    assert_metrics_equal(results["pd"]["baseline"], {"dense": m3_results["pd"]["model"]["dense"]})
    model, base = (
        results["pd"]["model"]["dense"]["ndcg_at_10"],
        results["pd"]["baseline"]["dense"]["ndcg_at_10"],
    )
    assert model != base
    table = storage.read_bytes(out.child("results.md")).decode()
    assert f"| pd | dense | ndcg_at_10 | {model:.4f} | {base:.4f} | {model - base:+.4f} |" in table
    assert manifest["files"]["runs"] == ["runs/pd/model-dense.jsonl", "runs/pd/baseline-dense.jsonl"]


def test_wrong_folders_and_sets_fail_before_ray_work(data, tmp_path):
    root, eval_set = data
    with pytest.raises(ConfigError, match=r"evaluate\.model: no model folder at .*missing"):
        evaluate.setup(make_config(tmp_path, "a", eval_set, root / "missing"))
    with pytest.raises(ConfigError, match=r"evaluate\.model: .*plain is a dense-only folder .*'sparse'"):
        evaluate.setup(make_config(tmp_path, "b", eval_set, root / "plain"))
    # a dense-only starting model beside an M3 model: compared on the dense scores it has
    plan = evaluate.setup(make_config(tmp_path, "b2", eval_set, root / "m3", baseline=str(root / "plain")))
    assert plan.methods == {"model": METHODS, "baseline": ["dense"]}
    with pytest.raises(ConfigError, match=r"evaluate\.baseline: .*plain is dense-only; add dense"):
        evaluate.setup(
            make_config(
                tmp_path, "b3", eval_set, root / "m3", baseline=str(root / "plain"), methods=["sparse"]
            )
        )
    no_qrels = tmp_path / "no-qrels"
    shutil.copytree(eval_set, no_qrels)
    shutil.rmtree(no_qrels / "qrels")
    with pytest.raises(
        ConfigError, match=r"evaluate\.sets\.0\.uri: set 'pd' .*no file for qrels/test or qrels"
    ):
        evaluate.setup(make_config(tmp_path, "c", no_qrels, root / "m3"))
    with pytest.raises(ConfigError, match=r"evaluate\.hybrid_weights"):
        evaluate.setup(make_config(tmp_path, "d", eval_set, root / "m3", hybrid_weights=[0, 0, 0]))
