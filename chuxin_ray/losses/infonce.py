"""InfoNCE over listed hard negatives, in-batch negatives and, optionally, other ranks' passages.

The contrastive loss of BGE / BGE-M3 finetuning (Chen et al. 2024, "BGE M3-Embedding", arXiv:2402.03216;
FlagEmbedding `abc/finetune/embedder/AbsModeling.py`, `_compute_in_batch_neg_loss`).

Passage layout everywhere in chuxin_ray: a batch of B queries comes with B*G passages in B groups of G,
each group holding the query's positive first and its G-1 listed negatives after it. In a (B, N) score
matrix the columns are passages in that layout, so query i's positive is column (query_offset + i) * G,
where query_offset = rank * B when the columns span every rank's passages. A matrix with N == G columns
holds each query's own group only (no in-batch negatives): the positive is column 0 for every row.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from chuxin_ray.losses.gather import all_gather_with_grad, world_and_rank


def upcast(scores: torch.Tensor) -> torch.Tensor:
    """Scores in float32, or wider if they already are: softmaxes over bf16 logits lose precision, as bf16
    keeps 8 significant bits (a step of 0.25 at logit 50, cosine 1 at scale 1/0.02)."""
    return scores.to(torch.promote_types(scores.dtype, torch.float32))


def positive_columns(
    num_queries: int,
    num_columns: int,
    group_size: int,
    query_offset: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Column of each query's positive in a (num_queries, num_columns) score matrix: (B,) int64."""
    if num_columns == group_size:
        return torch.zeros(num_queries, dtype=torch.long, device=device)  # (B,)
    if num_columns % group_size:
        raise ValueError(f"{num_columns} passage columns is not a whole number of groups of {group_size}")
    rows = torch.arange(num_queries, device=device)  # (B,)
    return (rows + query_offset) * group_size  # (B,)


def group_logits(logits: torch.Tensor, group_size: int, query_offset: int = 0) -> torch.Tensor:
    """Each query's own group (positive first) cut out of a (B, N) score matrix: (B, G).

    The student side of teacher-score distillation, which compares scores within a group only.
    """
    starts = positive_columns(logits.size(0), logits.size(1), group_size, query_offset, logits.device)  # (B,)
    columns = starts[:, None] + torch.arange(group_size, device=logits.device)  # (B, G)
    return logits.gather(1, columns)  # (B, G)


def info_nce(logits: torch.Tensor, group_size: int, query_offset: int = 0) -> torch.Tensor:
    """Mean cross-entropy of each row of `logits` (B, N), already divided by the temperature, against
    its positive column, in float32 at least (`upcast`)."""
    targets = positive_columns(
        logits.size(0), logits.size(1), group_size, query_offset, logits.device
    )  # (B,)
    return F.cross_entropy(upcast(logits), targets)  # ()


class InfoNCELoss(nn.Module):
    """InfoNCE of dense embeddings with temperature, over listed, in-batch and cross-device negatives.

    What is optimised: mean_i -log softmax_j(q_i . p_j / temperature)[pos(i)], j over the candidate
    passages: the query's own group only (in_batch_negatives=False), every passage of the local batch
    (default), or every passage of every rank (cross_device=True). Scale = 1/temperature; 0.02 is
    FlagEmbedding's default (`AbsArguments.py`, `temperature`), used with L2-normalised embeddings.

    Inputs: queries (B, H), passages (B*G, H) laid out as B groups of G, positive first.

    Cross-device: each rank scores its own B queries against the passages of all W ranks, gathered with
    `all_gather_with_grad`, with targets offset by rank * B. The mean over ranks of this loss is the
    big-batch loss, and the DDP-averaged gradient is its gradient (the gather's backward sums the
    passage gradients over ranks). Unlike FlagEmbedding, which gathers queries too and scores the full
    (W*B, W*B*G) matrix on every rank, no rank scores another rank's queries: W times fewer logits.
    """

    def __init__(
        self,
        temperature: float = 0.02,
        in_batch_negatives: bool = True,
        cross_device: bool = False,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if cross_device and not in_batch_negatives:
            raise ValueError(
                "cross_device needs in_batch_negatives: other ranks' passages are in-batch negatives"
            )
        self.temperature = temperature
        self.in_batch_negatives = in_batch_negatives
        self.cross_device = cross_device
        self.group = group

    def scores(self, queries: torch.Tensor, passages: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Raw similarities (no temperature) and the query offset that locates this rank's groups.

        Returns (B, W*B*G), (B, B*G) or (B, G) scores by mode, and rank * B (0 unless cross-device).
        """
        num_queries = queries.size(0)
        group_size = passages.size(0) // num_queries
        if not self.in_batch_negatives:
            grouped = passages.view(num_queries, group_size, -1)  # (B, G, H)
            return torch.einsum("bh,bgh->bg", queries, grouped), 0  # (B, G)
        query_offset = 0
        if self.cross_device:
            _, rank = world_and_rank(self.group)
            passages = all_gather_with_grad(passages, self.group)  # (W*B*G, H)
            query_offset = rank * num_queries
        return queries @ passages.T, query_offset  # (B, N)

    def forward(self, queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
        if passages.size(0) % queries.size(0):
            raise ValueError(f"{passages.size(0)} passages for {queries.size(0)} queries: expected B*G")
        group_size = passages.size(0) // queries.size(0)
        scores, query_offset = self.scores(queries, passages)  # (B, N)
        return info_nce(upcast(scores) / self.temperature, group_size, query_offset)  # ()
