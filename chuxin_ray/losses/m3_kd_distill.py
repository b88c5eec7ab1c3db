"""BGE-M3's listwise distillation from teacher scores over in-batch score matrices.

FlagEmbedding's `kd_loss_type="m3_kd_loss"` (`abc/finetune/embedder/AbsModeling.py`, `distill_loss`),
the loss BGE-M3 (Chen et al. 2024, "BGE M3-Embedding", arXiv:2402.03216) was finetuned with when
reranker scores are available.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chuxin_ray.losses.infonce import group_logits, positive_columns, upcast


class M3KDDistillLoss(nn.Module):
    """Teacher-weighted sum of InfoNCE terms, one per passage of the group, each against the candidates
    left after removing the group's earlier passages.

    What is optimised, with w = softmax(teacher_scores / teacher_temperature) (B, G), s = student
    logits (student_scores / temperature) and c_ij the column of query i's j-th group passage:

        L = mean_i sum_j w_ij * (logsumexp_{k not in {c_i0..c_i(j-1)}} s_ik - s_i c_ij)

    Term j treats passage j as the positive and drops passages 0..j-1 of the query's own group from
    the candidates (other queries' passages stay as negatives). With a one-hot teacher on the positive
    this is plain InfoNCE. Upstream loops over j and masks with finfo.min; here one logsumexp over the
    non-group columns plus a reversed cumulative logsumexp over the group gives all G terms at once.

    Inputs: student_scores (B, N) raw scores over B*G local, W*B*G cross-device or G own-group
    passages in the layout of `infonce`; teacher_scores (B, G), positive first; query_offset = rank*B
    when the columns span all ranks. Upstream gathers teacher targets and queries from every rank
    instead; the DDP-averaged gradient is the same.
    """

    def __init__(self, temperature: float = 0.02, teacher_temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature

    def forward(
        self, student_scores: torch.Tensor, teacher_scores: torch.Tensor, query_offset: int = 0
    ) -> torch.Tensor:
        num_queries, group_size = teacher_scores.shape
        logits = upcast(student_scores) / self.temperature  # (B, N)
        weights = F.softmax(upcast(teacher_scores.detach()) / self.teacher_temperature, dim=-1)  # (B, G)
        own = group_logits(logits, group_size, query_offset)  # (B, G)
        # logsumexp over passages j..G-1 of the own group, for every j
        tail = own.flip(-1).logcumsumexp(-1).flip(-1)  # (B, G)
        if logits.size(1) > group_size:
            starts = positive_columns(
                num_queries, logits.size(1), group_size, query_offset, logits.device
            )  # (B,)
            columns = starts[:, None] + torch.arange(group_size, device=logits.device)  # (B, G)
            # finfo.min, not -inf: exp underflows to 0 all the same and no 0 * inf reaches the gradient
            others = logits.scatter(1, columns, torch.finfo(logits.dtype).min)  # (B, N)
            tail = torch.logaddexp(tail, others.logsumexp(-1, keepdim=True))  # (B, G)
        return ((tail - own) * weights).sum(-1).mean()  # ()
