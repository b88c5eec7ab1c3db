"""Streamed top-k over corpus shards against brute force over the concatenated corpus.

Brute force with a defined tie order is a stable descending sort of the whole score matrix (earlier
document first); torch.topk gives the same scores but may pick any of several tied documents.
Integer-valued embeddings make every inner product exact in float32, so sharded and whole-corpus
matmuls agree bit for bit and ties are plentiful.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chuxin_ray.config import ConfigError
from chuxin_ray.retrieval.topk import TopK, search_exact


def shard(
    embeddings: torch.Tensor, ids: np.ndarray, sizes: list[int]
) -> list[tuple[torch.Tensor, np.ndarray]]:
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == len(ids)
    return [(embeddings[a:b], ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def brute_force(queries: torch.Tensor, corpus: torch.Tensor, ids: np.ndarray, k: int):
    scores = queries @ corpus.T  # (Q, N)
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]  # (Q, k)
    return scores.gather(1, order), ids[order.numpy()], scores


def random_sizes(rng: np.random.Generator, total: int) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(min(rng.choice([0, 1, 2, 3, 5, 17, 40]), total - sum(sizes))))
    return sizes


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 4, 10, 25])
def test_ties_equal_brute_force(seed: int, k: int):
    rng = np.random.default_rng(seed)
    corpus = torch.from_numpy(rng.integers(-1, 2, size=(300, 4))).float()  # 81 distinct vectors: many ties
    queries = torch.from_numpy(rng.integers(-1, 2, size=(23, 4))).float()
    ids = np.array([f"doc{i}" for i in range(300)])
    sizes = random_sizes(rng, 300)  # shards of 0..40 rows, many smaller than k

    scores, got = search_exact(queries, shard(corpus, ids, sizes), k, query_chunk=7)
    want_scores, want_ids, all_scores = brute_force(queries, corpus, ids, k)

    assert got.shape == (23, k)
    assert torch.equal(scores, want_scores)
    np.testing.assert_array_equal(got, want_ids)
    assert torch.equal(scores, all_scores.topk(k, dim=1).values)  # torch.topk's scores, exactly


def test_float_embeddings_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(1000, 32, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(50, 32, generator=g), dim=1)
    ids = np.arange(1000, dtype=np.int64) * 10  # int ids, not positions
    scores, got = search_exact(queries, shard(corpus, ids, [100] * 10), k=20, query_chunk=16)

    values, cols = (queries @ corpus.T).topk(20, dim=1)  # (50, 20)
    np.testing.assert_array_equal(got, ids[cols.numpy()])
    torch.testing.assert_close(scores, values, rtol=0, atol=1e-6)


def test_duplicates_across_a_shard_boundary_keep_corpus_order():
    # The same vector at rows 2, 5 and 6; k = 2 cuts among them: the two earliest win, in corpus order.
    corpus = torch.tensor(
        [[0.0, 1.0], [0.1, 0.0], [1.0, 0.0], [0.0, 0.5], [0.2, 0.0], [1.0, 0.0], [1.0, 0.0]]
    )
    ids = np.array(["a", "b", "c", "d", "e", "f", "g"])
    query = torch.tensor([[1.0, 0.0]])
    for sizes in ([7], [3, 4], [5, 2], [1, 1, 1, 1, 1, 1, 1], [6, 1]):
        scores, got = search_exact(query, shard(corpus, ids, sizes), k=2)
        assert got.tolist() == [["c", "f"]], sizes
        assert scores.tolist() == [[1.0, 1.0]]


def test_k_larger_than_the_corpus_returns_every_document():
    g = torch.Generator().manual_seed(1)
    corpus, queries = torch.randn(6, 8, generator=g), torch.randn(3, 8, generator=g)
    ids = np.arange(6)
    scores, got = search_exact(queries, shard(corpus, ids, [2, 0, 3, 1]), k=10)
    want_scores, want_ids, _ = brute_force(queries, corpus, ids, 6)
    assert scores.shape == (3, 6) and got.shape == (3, 6)  # min(k, N) columns, no padding
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got, want_ids)


def test_topk_streaming_api_and_id_types():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(4, 30, generator=g)  # (Q, N)
    merge = TopK(5)
    merge.update(scores[:, :3], torch.arange(3))  # torch ids
    merge.update(scores[:, 3:4], [3])  # list ids
    merge.update(scores[:, 4:4], np.array([], dtype=np.int64))  # empty block
    merge.update(scores[:, 4:], np.arange(4, 30))  # numpy ids
    got_scores, got_ids = merge.result()
    values, cols = scores.topk(5, dim=1)
    assert torch.equal(got_scores, values)
    np.testing.assert_array_equal(got_ids, cols.numpy())
    assert merge.seen == 30


def test_errors_name_the_problem():
    queries = torch.ones(2, 4)
    with pytest.raises(ValueError, match="corpus is empty|no documents"):
        search_exact(queries, [], k=3)
    with pytest.raises(ValueError, match="no documents"):
        search_exact(queries, [(torch.ones(0, 4), [])], k=3)
    with pytest.raises(ValueError, match="corpus shard 1: embeddings"):
        search_exact(queries, [(torch.ones(2, 4), [0, 1]), (torch.ones(2, 3), [2, 3])], k=3)
    with pytest.raises(ValueError, match="corpus shard 0: 2 embeddings but ids"):
        search_exact(queries, [(torch.ones(2, 4), [0, 1, 2])], k=3)
    with pytest.raises(ValueError, match="NaN"):
        search_exact(queries, [(torch.full((2, 4), float("nan")), [0, 1])], k=1)
    with pytest.raises(ValueError, match="k must be"):
        TopK(0)
    merge = TopK(2)
    merge.update(torch.ones(2, 3), [0, 1, 2])
    with pytest.raises(ValueError, match="block has 3 queries"):
        merge.update(torch.ones(3, 3), [3, 4, 5])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cpu():
    rng = np.random.default_rng(7)
    corpus = torch.from_numpy(rng.integers(-2, 3, size=(5000, 16))).float()  # exact products, many ties
    queries = torch.from_numpy(rng.integers(-2, 3, size=(300, 16))).float()
    ids = np.arange(5000)
    shards = shard(corpus, ids, [1000, 7, 993, 3000])
    cpu_scores, cpu_ids = search_exact(queries, shards, k=50, query_chunk=128)
    gpu_scores, gpu_ids = search_exact(queries, shards, k=50, query_chunk=128, device="cuda")
    assert torch.equal(cpu_scores, gpu_scores)
    np.testing.assert_array_equal(cpu_ids, gpu_ids)


@pytest.mark.parametrize(("spec", "nprobe"), [("Flat", None), ("IVF4,Flat", 4), ("HNSW16", None)])
def test_faiss_search_equals_the_exact_search(spec: str, nprobe: int | None):
    """mine.search: faiss. Flat and a fully probed IVF are exact; HNSW on 600 points finds the same top 10."""
    from chuxin_ray.retrieval.faiss_search import search_faiss

    generator = torch.Generator().manual_seed(5)
    corpus = torch.nn.functional.normalize(torch.randn(600, 16, generator=generator), dim=-1)  # (N, H)
    queries = torch.nn.functional.normalize(torch.randn(25, 16, generator=generator), dim=-1)  # (Q, H)
    shards = [(corpus[i : i + 200], np.arange(i, i + 200) * 10) for i in range(0, 600, 200)]
    exact_scores, exact_ids = search_exact(queries, shards, k=10)
    scores, ids = search_faiss(queries, shards, k=10, spec=spec, nprobe=nprobe)
    assert ids.tolist() == exact_ids.tolist()
    torch.testing.assert_close(scores, exact_scores, rtol=0, atol=1e-5)


def test_faiss_index_errors_name_the_key():
    from chuxin_ray.retrieval.faiss_search import check_index_spec, search_faiss

    with pytest.raises(ConfigError, match=r"mine\.faiss_index: 'IVFx' is not a faiss index_factory string"):
        check_index_spec("IVFx", "mine.faiss_index")
    shards = [(torch.eye(4)[:3], np.arange(3))]
    with pytest.raises(ValueError, match=r"fewer than 3 neighbours in corpus shard 0 .*mine\.faiss_nprobe"):
        # 2 lists, 1 probed: a query sees one list's documents only
        search_faiss(torch.eye(4)[:1], shards * 1, k=3, spec="IVF2,Flat", nprobe=1)
