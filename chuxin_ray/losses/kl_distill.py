"""KL distillation of a teacher's score distribution into the student's.

FlagEmbedding's `kd_loss_type="kl_div"` (`abc/finetune/embedder/AbsModeling.py`, `distill_loss`), used
with reranker scores stored as `pos_scores`/`neg_scores`, and by BGE-M3's self-knowledge distillation
(Chen et al. 2024, "BGE M3-Embedding", arXiv:2402.03216) with the ensemble score as teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chuxin_ray.losses.infonce import upcast


class KLDistillLoss(nn.Module):
    """KL(softmax(teacher / teacher_temperature) || softmax(student / temperature)), mean over rows.

    What is optimised: the student's distribution over each row's candidates moves towards the
    teacher's; the teacher side is detached. Inputs: student_scores and teacher_scores, both (B, K) raw
    scores over the same K candidates: each query's group (B, G) for teacher-score distillation
    (`infonce.group_logits` cuts it from an in-batch matrix), or whole rows for self-distillation.

    Defaults: temperature 0.02 as the contrastive loss; teacher_temperature 1.0 because FlagEmbedding
    softmaxes the stored teacher scores unscaled (`AbsModeling.forward`, `F.softmax(teacher_scores)`).

    FlagEmbedding returns the cross-entropy -sum p_t log p_s, which is this KL plus the teacher's
    entropy: the same gradient, but here the value is 0 when the student matches the teacher.
    """

    def __init__(self, temperature: float = 0.02, teacher_temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature

    def forward(self, student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
        if student_scores.shape != teacher_scores.shape:
            raise ValueError(
                f"student {tuple(student_scores.shape)} and teacher {tuple(teacher_scores.shape)}"
            )
        student_log_p = F.log_softmax(upcast(student_scores) / self.temperature, dim=-1)  # (B, K)
        teacher_log_p = F.log_softmax(
            upcast(teacher_scores.detach()) / self.teacher_temperature, dim=-1
        )  # (B, K)
        return F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)  # ()
