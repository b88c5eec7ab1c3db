"""Hard-negative mining on the local Ray with a tiny encoder: the encoder equals FlagEmbedding's
FlagModel, the stage's top-k equals brute force on its own embeddings, negatives come from the rank
range, positives are excluded by id (a same-text passage under another id stays eligible)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from chuxin_ray import demo, storage
from chuxin_ray.config import EncoderRuntime, MineConfig, load_config
from chuxin_ray.models.tiny import tiny_xlmr_config
from chuxin_ray.stages import mine

pytestmark = pytest.mark.integration

N_CORPUS, N_QUERIES = 150, 40
TOL = 1e-6  # float32 dot products of unit vectors of width 32 round at ~1e-7


def build_tiny_encoder(tok_dir, out_dir, seed: int = 0):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # initializer_range 0.5: at XLM-R's 0.02 a tiny random encoder maps every text to nearly the
        # same vector (mean cosine 0.99999), and ranks would be float rounding; at 0.5 it is ~0.6.
        model = AutoModel.from_config(
            tiny_xlmr_config(vocab_size=len(tok), hidden=32, dropout=0.0, initializer_range=0.5)
        )
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine")
    texts = demo.people_daily()[: N_CORPUS - 1]
    tok = demo.train_tokenizer(texts, root / "tokenizer", vocab_size=800)
    encoder = build_tiny_encoder(tok, root / "encoder")
    # The corpus: 149 passages plus a twin of passage 0 (same text, another id).
    ids = [f"doc-{i}" for i in range(N_CORPUS - 1)] + ["twin-of-doc-0"]
    corpus = root / "corpus"
    corpus.mkdir()
    for k, part in enumerate((range(0, 70), range(70, N_CORPUS))):
        pq.write_table(
            pa.table({"id": [ids[i] for i in part], "text": [(texts + texts[:1])[i] for i in part]}),
            corpus / f"part-{k}.parquet",
        )
    # Queries: the first 20 chars of a passage; query i's positive is doc-i.
    queries = root / "queries"
    queries.mkdir()
    pq.write_table(
        pa.table(
            {
                "query_id": [f"doc-{i}#q0" for i in range(N_QUERIES)],
                "passage_id": [f"doc-{i}" for i in range(N_QUERIES)],
                "query": [texts[i][:20] for i in range(N_QUERIES)],
                "passage": [texts[i] for i in range(N_QUERIES)],
                "source": ["news"] * N_QUERIES,
            }
        ),
        queries / "part-0.parquet",
    )
    return root, encoder, corpus, queries


def make_config(root, encoder, corpus, queries, name="run", **mine_keys):
    section = {
        "encoder": str(encoder),
        "input": str(queries),
        "corpus": str(corpus),
        "query_max_length": 32,
        "passage_max_length": 64,
        "range_start": 0,
        "range_end": 20,
        "negative_number": 5,
        "corpus_shard_rows": 40,
        "query_shard_rows": 16,
        "query_chunk": 7,
        "runtime": {"batch_size": 16},
        **mine_keys,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "mine", "output": str(root / name)}, "mine": section}))
    return load_config(path)


def read_output(cfg) -> tuple[dict, list[dict], storage.Location]:
    out = storage.resolve(cfg.stage_output("mine"))
    manifest = storage.read_manifest(out)
    rows = []
    for f in manifest["files"]["data"]:
        rows += [json.loads(line) for line in storage.read_bytes(out.child(f["path"])).decode().splitlines()]
    return manifest, rows, out


def test_encoder_equals_flagembedding_flagmodel(data):
    from FlagEmbedding import FlagModel

    _, encoder, _, _ = data
    texts = demo.people_daily()[:25]
    ours = mine.EmbedShards(str(encoder), None, EncoderRuntime(batch_size=4)).embed(texts, max_length=48)
    flag = FlagModel(
        str(encoder), pooling_method="cls", normalize_embeddings=True, use_fp16=False, devices="cpu"
    )
    theirs = flag.encode_corpus(texts, batch_size=8, max_length=48)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_mining_from_the_rank_range_without_positives(data, ray_local):
    root, encoder, corpus, queries = data
    # negative_number 20 = the whole range [0, 20) and no random fill: the choice is exact, the range
    # less the positive where the positive ranks in it.
    cfg = make_config(root, encoder, corpus, queries, negative_number=20, fill_random=False)
    mine.main(cfg)
    manifest, rows, out = read_output(cfg)
    assert len(rows) == N_QUERIES == manifest["counts"]["funnel"]["queries_mined"]
    assert len(manifest["files"]["data"]) == 3  # 40 queries in search shards of 16

    # Brute force on the stage's own embedding files: a stable descending sort of Q @ C.T.
    def load(kind):
        files = sorted(storage.list_files(out.child("embeddings", kind)), key=lambda f: f.path)
        table = pa.concat_tables(pq.read_table(f.path) for f in files)
        return table, mine.embedding_matrix(table.column("embedding")), [f.path for f in files]

    corpus_table, c_emb, corpus_paths = load("corpus")
    query_table, q_emb, _ = load("queries")
    assert corpus_table.column("row").to_pylist() == list(range(N_CORPUS))
    corpus_ids = corpus_table.column("id").to_pylist()
    texts = dict(zip(corpus_ids, corpus_table.column("text").to_pylist(), strict=True))
    # float64 reference: float32 matmuls in numpy and torch round differently, and a tiny random
    # encoder has many near-ties, so ranks are compared up to ties within TOL.
    scores = q_emb.astype(np.float64) @ c_emb.astype(np.float64).T  # (Q, N)
    ordered = -np.sort(-scores, axis=1)  # (Q, N) best first
    column = {cid: j for j, cid in enumerate(corpus_ids)}
    query_ids = query_table.column("query_id").to_pylist()

    # The stage's search (corpus in 4 shards, queries in chunks of 7) equals brute force, and so does
    # its faiss path (a Flat index per shard, and an IVF index with every list probed: both exact).
    for search in (
        MineConfig(query_chunk=7),
        MineConfig(search="faiss"),
        MineConfig(search="faiss", faiss_index="IVF2,Flat", faiss_nprobe=2),
    ):
        top_scores, top = mine.top_rows(q_emb, out, corpus_paths, 30, search, device="cpu")
        np.testing.assert_allclose(top_scores, ordered[:, :30], atol=TOL)
        np.testing.assert_allclose(np.take_along_axis(scores, top, axis=1), ordered[:, :30], atol=TOL)
        assert all(len(set(r)) == 30 for r in top.tolist())

    in_range = 0
    for i, row in enumerate(r for qid in query_ids for r in rows if r["query_id"] == qid):
        positive = row["query_id"].split("#")[0]
        assert row["pos_ids"] == [positive] and positive not in row["neg_ids"]
        # The range [0, 20): negatives plus the positive when it ranks there, a valid top 20.
        chosen = [column[n] for n in row["neg_ids"]]
        pos_in_range = scores[i, column[positive]] >= ordered[i, 19] - TOL
        in_range += pos_in_range
        assert len(chosen) == 20 - pos_in_range == len(set(chosen))
        assert scores[i, chosen].min() >= ordered[i, 19] - TOL
        for j, rank in zip(chosen, row["neg_ranks"], strict=True):
            assert 0 <= rank < 20 and abs(scores[i, j] - ordered[i, rank]) <= TOL
        assert row["neg"] == [texts[n] for n in row["neg_ids"]]
    # doc-0's twin has doc-0's text under another id: exclusion is by id, so it stays a negative.
    doc0 = next(r for r in rows if r["query_id"] == "doc-0#q0")
    assert doc0["neg_ranks"][0] == 0  # doc-0's own text ranks first for its query: the twin ties it
    assert "twin-of-doc-0" in doc0["neg_ids"] and doc0["pos"][0] in doc0["neg"]
    funnel = manifest["counts"]["funnel"]
    assert funnel["positives_excluded_from_range"] == in_range == funnel["queries_short_of_negatives"]
    assert 0 < in_range < N_QUERIES  # both cases occur
    assert funnel["negatives_mined"] == funnel["negatives_from_range"] == sum(len(r["neg"]) for r in rows)

    # Complete: a second run does nothing.
    assert mine.main(cfg)["finished_at"] == manifest["finished_at"]

    # Sampling 5 of the range: a subset of it, and the same sample on a forced rerun (seeded per query).
    sample_cfg = make_config(root, encoder, corpus, queries, name="sample", negative_number=5)
    mine.main(sample_cfg)
    _, sampled, _ = read_output(sample_cfg)
    exact = {r["query_id"]: set(r["neg_ids"]) for r in rows}  # the same embeddings: the same range
    for row in sampled:
        assert len(set(row["neg_ids"])) == 5 and set(row["neg_ids"]) <= exact[row["query_id"]]
    mine.main(sample_cfg, force=True)
    assert read_output(sample_cfg)[1] == sampled


def test_too_few_candidates_are_filled_with_random_passages(data, ray_local):
    root, encoder, corpus, queries = data
    cfg = make_config(root, encoder, corpus, queries, name="fill", range_start=146, range_end=150)
    mine.main(cfg)
    manifest, rows, _ = read_output(cfg)
    funnel = manifest["counts"]["funnel"]
    assert funnel["negatives_random_fill"] > 0 and funnel["queries_short_of_negatives"] == 0
    for row in rows:
        assert row["pos_ids"][0] not in row["neg_ids"] and len(set(row["neg_ids"])) == 5
        ranked = [r for r in row["neg_ranks"] if r >= 0]
        assert all(146 <= r < 150 for r in ranked) and row["neg_ranks"].count(-1) == 5 - len(ranked)
