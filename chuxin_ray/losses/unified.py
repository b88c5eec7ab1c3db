"""BGE-M3's unified loss: contrastive losses of the dense, sparse, ColBERT and ensemble scores, plus
self-knowledge distillation from the ensemble into each head.

Chen et al. 2024, "BGE M3-Embedding", arXiv:2402.03216 (self-knowledge distillation). Every constant that
FlagEmbedding 1.4.2 writes inline in `finetune/embedder/encoder_only/m3/modeling.py` (`forward`,
`ensemble_score`) is a named field of `UnifiedLossWeights`, defaulting to that value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from chuxin_ray.losses.contrastive import ContrastiveLoss
from chuxin_ray.losses.infonce import upcast
from chuxin_ray.losses.kl_distill import KLDistillLoss
from chuxin_ray.models.m3 import ensemble_scores


@dataclass(frozen=True)
class UnifiedLossWeights:
    """Weights of the unified loss; defaults are FlagEmbedding's M3 `modeling.py` constants.

    heads = (dense * L_dense + ensemble * L_ens + sparse * L_sparse + colbert * L_colbert) / heads_divisor
        upstream: `loss = (loss + ensemble_loss + 0.1 * sparse_loss + colbert_loss) / 4`
    distill = (distill_dense * KL_d + distill_sparse * KL_s + distill_colbert * KL_c) / distill_divisor
        upstream: `(dense_self_distill_loss + 0.1 * sparse_self_distill_loss + colbert_self_distill_loss) / 3`
    total = (heads + distill) / total_divisor once self-distillation runs, else heads
        upstream: `loss += ...; loss = loss / 2`
    ensemble score = ensemble_dense * s_d + ensemble_sparse * s_s + ensemble_colbert * s_c
        upstream `ensemble_score`: `dense_scores + 0.3 * sparse_scores + colbert_scores`
    """

    dense: float = 1.0
    ensemble: float = 1.0
    sparse: float = 0.1
    colbert: float = 1.0
    heads_divisor: float = 4.0
    ensemble_dense: float = 1.0
    ensemble_sparse: float = 0.3
    ensemble_colbert: float = 1.0
    distill_dense: float = 1.0
    distill_sparse: float = 0.1
    distill_colbert: float = 1.0
    distill_divisor: float = 3.0
    total_divisor: float = 2.0


class UnifiedLoss(nn.Module):
    """The BGE-M3 unified finetuning loss with self-knowledge distillation.

    What is optimised (all scores divided by `temperature`, 0.02):
      1. a contrastive loss per score: dense, sparse, ColBERT and their ensemble (`UnifiedLossWeights`),
         each InfoNCE over the group and in-batch negatives, or, with teacher scores, InfoNCE + KL to
         the teacher (`kd_loss="kl"`, FlagEmbedding's `kl_div` default) or `m3_kd` alone;
      2. once step > self_distill_start_step, KL from the detached softmax of the ensemble scores to
         each head's, over whole rows, and the total becomes (heads + distill) / 2. Upstream compares
         a counter of forward calls with `self_distill_start_step` (default -1: from the first call);
         here the caller passes the step it wants counted (the optimizer step, so that gradient
         accumulation and GradCache do not shift the start).

    Inputs: dense_scores (B, N_d), sparse_scores (B, N), colbert_scores (B, N): raw similarities,
    N = B*G local passages in the `infonce` layout (or N = G: own group only). Dense may span every
    rank's passages (N_d = W*B*G, cross-device negatives, with dense_query_offset = rank*B); sparse
    and ColBERT stay local, as upstream disables cross-device negatives for them, and the ensemble
    uses the rank's own block of the dense scores. teacher_scores (B, G): reranker scores, positive
    first.

    Differences from upstream, on purpose: every KL term is the true KL where FlagEmbedding returns the
    cross-entropy, so the value is upstream's minus the weighted teacher entropies with the same
    gradient (tests/unit/test_m3_heads.py checks both against FlagEmbedding's model); use_self_distill
    defaults to True, as BGE-M3's recipe runs it (`--use_self_distill True`; the CLI default is False).
    """

    def __init__(
        self,
        weights: UnifiedLossWeights | None = None,
        temperature: float = 0.02,
        use_self_distill: bool = True,
        self_distill_start_step: int = -1,
        kd_loss: Literal["kl", "m3_kd"] = "kl",
        teacher_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.weights = weights or UnifiedLossWeights()
        self.temperature = temperature
        self.use_self_distill = use_self_distill
        self.self_distill_start_step = self_distill_start_step
        self.kd_loss = kd_loss
        self.contrastive = ContrastiveLoss(kd_loss, teacher_temperature)
        self.self_kl = KLDistillLoss(temperature=1.0, teacher_temperature=1.0)

    def self_distill_active(self, step: int) -> bool:
        return self.use_self_distill and step > self.self_distill_start_step

    def terms(
        self,
        dense_scores: torch.Tensor,
        sparse_scores: torch.Tensor,
        colbert_scores: torch.Tensor,
        group_size: int,
        step: int,
        teacher_scores: torch.Tensor | None = None,
        dense_query_offset: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Every named term (for metrics) and their combination under "loss"."""
        w = self.weights
        local = sparse_scores.size(1)
        dense = upcast(dense_scores) / self.temperature  # (B, N_d)
        sparse = upcast(sparse_scores) / self.temperature  # (B, N)
        colbert = upcast(colbert_scores) / self.temperature  # (B, N)
        dense_local = dense  # (B, N)
        if dense.size(1) != local:
            start = dense_query_offset * group_size
            dense_local = dense[:, start : start + local]  # (B, N)
        ensemble = ensemble_scores(
            dense_local, sparse, colbert, w.ensemble_dense, w.ensemble_sparse, w.ensemble_colbert
        )  # (B, N)

        terms = {
            "dense": self.contrastive(dense, group_size, teacher_scores, dense_query_offset),
            "sparse": self.contrastive(sparse, group_size, teacher_scores, 0),
            "colbert": self.contrastive(colbert, group_size, teacher_scores, 0),
            "ensemble": self.contrastive(ensemble, group_size, teacher_scores, 0),
        }
        loss = (
            w.dense * terms["dense"]
            + w.ensemble * terms["ensemble"]
            + w.sparse * terms["sparse"]
            + w.colbert * terms["colbert"]
        ) / w.heads_divisor  # ()
        if self.self_distill_active(step):
            teacher = ensemble.detach()  # (B, N)
            terms["self_distill_dense"] = self.self_kl(dense_local, teacher)
            terms["self_distill_sparse"] = self.self_kl(sparse, teacher)
            terms["self_distill_colbert"] = self.self_kl(colbert, teacher)
            distill = (
                w.distill_dense * terms["self_distill_dense"]
                + w.distill_sparse * terms["self_distill_sparse"]
                + w.distill_colbert * terms["self_distill_colbert"]
            ) / w.distill_divisor  # ()
            loss = (loss + distill) / w.total_divisor  # ()
        terms["loss"] = loss
        return terms

    def forward(
        self,
        dense_scores: torch.Tensor,
        sparse_scores: torch.Tensor,
        colbert_scores: torch.Tensor,
        group_size: int,
        step: int,
        teacher_scores: torch.Tensor | None = None,
        dense_query_offset: int = 0,
    ) -> torch.Tensor:
        return self.terms(
            dense_scores, sparse_scores, colbert_scores, group_size, step, teacher_scores, dense_query_offset
        )["loss"]
