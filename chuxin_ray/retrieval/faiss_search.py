"""Top-k inner-product search through a faiss index per corpus shard, merged like the exact search.

`mine.search: faiss` with `mine.faiss_index` (a faiss index_factory string): "Flat" is exact (faiss's
kernels instead of our matmul), "IVF1024,Flat" or "HNSW32" trade recall for speed on large shards.
Each shard gets its own index (trained on that shard when the type needs training), searched for the
shard's best k, and merged into the same running top-k as the exact path (retrieval/topk.py TopK), so
only one shard's index is in memory at a time. faiss is optional (`pip install faiss-cpu`, the `faiss`
extra); nothing imports it unless this search is configured.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from chuxin_ray.config import ConfigError
from chuxin_ray.retrieval.topk import TopK


def require_faiss(key: str):
    try:
        import faiss
    except ImportError:
        raise ImportError(
            f"{key}: faiss is not installed: `pip install faiss-cpu` (or `chuxin_ray[faiss]`), "
            "or use the exact search"
        ) from None
    return faiss


def check_index_spec(spec: str, key: str) -> None:
    """On the driver, before any Ray work: a missing faiss or a factory string it cannot build is a
    ConfigError naming the key."""
    try:
        faiss = require_faiss(key)
    except ImportError as e:
        raise ConfigError(str(e)) from None
    try:
        faiss.index_factory(8, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ConfigError(f"{key}: {spec!r} is not a faiss index_factory string: {str(e)[:200]}") from None


def search_faiss(
    queries: torch.Tensor | np.ndarray,
    corpus_shards: Iterable[tuple[torch.Tensor | np.ndarray, Any]],
    k: int,
    spec: str = "Flat",
    nprobe: int | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Same contract as retrieval.topk.search_exact: scores (Q, min(k, N)) float32, ids, best first."""
    faiss = require_faiss("mine.search")
    q = np.ascontiguousarray(torch.as_tensor(queries).float().cpu().numpy())  # (Q, H)
    merge = TopK(k)
    for index_no, (embeddings, ids) in enumerate(corpus_shards):
        shard = np.ascontiguousarray(torch.as_tensor(embeddings).float().cpu().numpy())  # (N_i, H)
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)  # (N_i,)
        if shard.ndim != 2 or shard.shape[1] != q.shape[1] or ids.shape != (shard.shape[0],):
            raise ValueError(
                f"corpus shard {index_no}: embeddings {shard.shape} and ids {ids.shape} do not match "
                f"queries of width {q.shape[1]}"
            )
        if len(shard) == 0:
            continue
        index = faiss.index_factory(q.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(shard)
        if nprobe is not None:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        index.add(shard)
        kb = min(k, len(shard))
        scores, cols = index.search(q, kb)  # (Q, kb), (Q, kb); -1 where the index found fewer
        if (cols < 0).any():
            raise ValueError(
                f"faiss index {spec!r} found fewer than {kb} neighbours in corpus shard {index_no} for "
                f"{int((cols < 0).any(axis=1).sum())} queries: raise mine.faiss_nprobe or use a Flat index"
            )
        merge.merge(torch.from_numpy(scores), ids[cols], len(shard))
    if merge.seen == 0:
        raise ValueError("no documents in the corpus shards")
    return merge.result()
