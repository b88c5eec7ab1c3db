"""The contrastive term of one score matrix, with or without teacher scores.

What is optimised, on logits (B, N) already divided by the temperature, in the `infonce` layout:
  - no teacher scores: InfoNCE against each query's positive;
  - teacher scores (B, G), kd_loss "kl": InfoNCE + KL(teacher || student) over each query's own group
    (FlagEmbedding's `kl_div` knowledge distillation);
  - teacher scores, kd_loss "m3_kd": BGE-M3's m3_kd loss alone (`m3_kd_distill`).
The finetune stage applies it to dense scores; the unified loss to each head and the ensemble.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from chuxin_ray.losses.infonce import group_logits, info_nce
from chuxin_ray.losses.kl_distill import KLDistillLoss
from chuxin_ray.losses.m3_kd_distill import M3KDDistillLoss


class ContrastiveLoss(nn.Module):
    def __init__(self, kd_loss: Literal["kl", "m3_kd"] = "kl", teacher_temperature: float = 1.0) -> None:
        super().__init__()
        if kd_loss not in ("kl", "m3_kd"):
            raise ValueError(f"kd_loss must be 'kl' or 'm3_kd', got {kd_loss!r}")
        self.kd_loss = kd_loss
        # the inputs are logits already, so these run at temperature 1
        self.teacher_kl = KLDistillLoss(temperature=1.0, teacher_temperature=teacher_temperature)
        self.teacher_m3_kd = M3KDDistillLoss(temperature=1.0, teacher_temperature=teacher_temperature)

    def forward(
        self,
        logits: torch.Tensor,
        group_size: int,
        teacher_scores: torch.Tensor | None = None,
        query_offset: int = 0,
    ) -> torch.Tensor:
        if teacher_scores is None:
            return info_nce(logits, group_size, query_offset)  # ()
        if self.kd_loss == "m3_kd":
            return self.teacher_m3_kd(logits, teacher_scores, query_offset)  # ()
        student = group_logits(logits, group_size, query_offset)  # (B, G)
        return info_nce(logits, group_size, query_offset) + self.teacher_kl(student, teacher_scores)  # ()
