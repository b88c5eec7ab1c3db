"""Exact top-k inner-product search over a corpus streamed in shards.

The corpus never has to fit in memory: each shard's embeddings are scored against the queries, cut to
the shard's best k, and merged into a running best k per query (`TopK`). Only the (Q, k) state and one
(query_chunk, N_shard) score block live at once.

Ties are broken by corpus order, the order in which shards and their rows arrive: of two documents with
equal scores the earlier one ranks higher, whatever the shard boundaries. So the result equals a stable
descending sort of the concatenated score matrix cut to k, which is what tests compare against.
(torch.topk alone does not promise which of several equal scores it returns.)

Scores are inner products in float32; callers normalise embeddings when they want cosine similarity.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


class TopK:
    """The best `k` (score, id) pairs per query over every score block seen so far.

    update(scores (Q, N), ids (N,)) once per corpus block, in corpus order; result() -> scores (Q, k')
    float32 and ids (Q, k') numpy, best first, with k' = min(k, documents seen). ids are whatever the
    caller passed (strings, ints); int64 row numbers keep the state small (8 bytes per entry, against
    4 bytes per character for numpy strings) when Q * k is large, as in hard-negative mining.
    """

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.seen = 0  # documents seen per query
        self._scores: torch.Tensor | None = None  # (Q, k') best first
        self._ids: np.ndarray | None = None  # (Q, k')

    def update(self, scores: torch.Tensor, ids: Any) -> None:
        """Merge one block: `scores` (Q, N) for the block's N documents, `ids` their N ids in order."""
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)  # (N,)
        if scores.dim() != 2 or ids.shape != (scores.size(1),):
            raise ValueError(
                f"scores {tuple(scores.shape)} and ids {ids.shape} do not match: want (Q, N), (N,)"
            )
        if self._scores is not None and scores.size(0) != self._scores.size(0):
            raise ValueError(f"block has {scores.size(0)} queries, earlier blocks had {self._scores.size(0)}")
        if scores.size(1) == 0:
            return
        scores = scores.float()  # (Q, N)
        block_scores, block_cols = _block_top(scores, self.k)  # (Q, kb), (Q, kb)
        self.merge(block_scores, ids[block_cols.cpu().numpy()], scores.size(1))

    def merge(self, block_scores: torch.Tensor, block_ids: np.ndarray, documents: int) -> None:
        """Merge a block already cut to its best: scores (Q, kb) float32 best first (ties in corpus
        order), their ids (Q, kb), out of `documents` documents (an index's search result)."""
        self.seen += documents
        if self._scores is None:
            self._scores, self._ids = block_scores, block_ids
            return
        # Stable sort of [kept | block]: kept entries come earlier in the corpus, so on equal scores
        # they stay ahead, and each part is already in (score desc, corpus order).
        merged = torch.cat([self._scores, block_scores.to(self._scores.device)], dim=1)  # (Q, k' + kb)
        order = merged.sort(dim=1, descending=True, stable=True).indices[:, : self.k]  # (Q, k'')
        self._scores = merged.gather(1, order)  # (Q, k'')
        self._ids = np.take_along_axis(
            np.concatenate([self._ids, block_ids], axis=1), order.cpu().numpy(), axis=1
        )  # (Q, k'')

    def result(self) -> tuple[torch.Tensor, np.ndarray]:
        """scores (Q, min(k, seen)) float32 on the CPU and ids (Q, min(k, seen)), best first."""
        if self._scores is None:
            raise ValueError("no documents seen: the corpus is empty")
        return self._scores.cpu(), self._ids


def _block_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best min(k, N) of each row of `scores` (Q, N), ordered by score descending, then column."""
    kb = min(k, scores.size(1))
    # One column more than needed: a row whose extra column ties its k-th has tied documents left out,
    # and topk may have picked any of them. Those rows are redone by a stable sort (rare with float
    # scores: duplicate documents do it). Counting the ties with (scores == threshold).sum() instead
    # costs as much as the matmul (0.6 s against 1.2 s for 1024 x 65536 x 384 on 2 CPU threads).
    values, cols = scores.topk(min(kb + 1, scores.size(1)), dim=1)  # (Q, kb + 1) or (Q, kb)
    if torch.isnan(values).any():  # topk ranks NaN above everything, so any NaN in a row shows here
        raise ValueError("NaN in the scores: check the embeddings")
    ambiguous = (values[:, kb:] == values[:, kb - 1 : kb]).any(dim=1).nonzero().squeeze(1)  # (A,)
    values, cols = values[:, :kb], cols[:, :kb]  # (Q, kb)
    if ambiguous.numel():
        redo = scores[ambiguous].sort(dim=1, descending=True, stable=True)  # (A, N)
        values[ambiguous] = redo.values[:, :kb]
        cols[ambiguous] = redo.indices[:, :kb]
    # The chosen set is now exact; order it by column, then stably by score.
    cols, by_col = cols.sort(dim=1)  # (Q, kb)
    values = values.gather(1, by_col)  # (Q, kb)
    values, by_score = values.sort(dim=1, descending=True, stable=True)  # (Q, kb)
    return values, cols.gather(1, by_score)


def search_exact(
    queries: torch.Tensor | np.ndarray,
    corpus_shards: Iterable[tuple[torch.Tensor | np.ndarray, Any]],
    k: int,
    query_chunk: int = 1024,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Exact inner-product top-k of `queries` (Q, H) over shards of (embeddings (N_i, H), ids (N_i,)).

    Each shard is read once, in order; `query_chunk` rows of queries are scored against it at a time,
    so the peak score block is (query_chunk, N_i) float32: 1024 x 262144 is 1 GiB.
    Returns scores (Q, min(k, N)) float32 and ids (Q, min(k, N)), best first, N = corpus size;
    ties go to the earlier document in corpus order.
    """
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    queries = torch.as_tensor(queries).to(device=device, dtype=torch.float32)  # (Q, H)
    if queries.dim() != 2:
        raise ValueError(f"queries must be (Q, H), got {tuple(queries.shape)}")
    chunks = queries.split(query_chunk)  # each (C, H)
    merges = [TopK(k) for _ in chunks]
    for index, (embeddings, ids) in enumerate(corpus_shards):
        shard = torch.as_tensor(embeddings).to(device=queries.device, dtype=torch.float32)  # (N_i, H)
        if shard.dim() != 2 or shard.size(1) != queries.size(1):
            raise ValueError(
                f"corpus shard {index}: embeddings {tuple(shard.shape)} do not match queries of width "
                f"{queries.size(1)}"
            )
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)  # (N_i,) converted once
        if ids.shape != (shard.size(0),):
            raise ValueError(f"corpus shard {index}: {shard.size(0)} embeddings but ids of shape {ids.shape}")
        for chunk, merge in zip(chunks, merges, strict=True):
            merge.update(chunk @ shard.T, ids)  # (C, N_i)
    if merges[0].seen == 0:  # split() gives one (empty) chunk even for Q = 0
        raise ValueError("no documents in the corpus shards")
    results = [merge.result() for merge in merges]
    return torch.cat([s for s, _ in results]), np.concatenate([i for _, i in results])
