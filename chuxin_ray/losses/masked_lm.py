"""Masked-LM cross-entropy computed only at labelled positions.

Used twice by RetroMAE (Xiao et al. 2022, "RetroMAE: Pre-Training Retrieval-oriented Language Models Via
Masked Auto-Encoder", arXiv:2205.12035): for the encoder's MLM loss and for the enhanced decoder's
reconstruction loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index and HF's label convention


def _label_sum(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    logits = head(hidden)  # (N, V)
    return F.cross_entropy(logits.float(), labels, reduction="sum")  # ()


def masked_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `lm_head(hidden)` against `labels` over the positions whose label is not -100.

    What is optimised: -mean_{(b, i): labels[b, i] != -100} log softmax(lm_head(hidden[b, i]))[labels[b, i]],
    the same value as F.cross_entropy(lm_head(hidden).flatten(0, 1), labels.flatten(), ignore_index=-100),
    but the (B, L, V) logits are never built: the hidden states at labelled positions are gathered first
    and the head runs on those N rows only. With a 250,002-id vocabulary the head is most of the step,
    and the encoder labels ~30% of tokens.

    Inputs: hidden (B, L, H) final hidden states; labels (B, L) target ids or -100; lm_head maps (N, H)
    to (N, V) logits (the model's whole MLM head, transform included). chunk_size: when set, the N rows
    go through the head `chunk_size` at a time under activation checkpointing, so at most
    chunk_size x V logits are alive at once, for ~1/3 more head FLOPs (the forward is recomputed).

    With no labelled position the loss is 0 and still depends on the head (every parameter gets a zero
    gradient, which DDP needs). The boolean gather syncs with the device once (N is data-dependent).
    """
    selected = labels.ne(IGNORE_INDEX)  # (B, L)
    rows = hidden[selected]  # (N, H)
    targets = labels[selected]  # (N,)
    count = targets.numel()
    if chunk_size is None or count <= chunk_size:
        total = _label_sum(lm_head, rows, targets)  # ()
    else:
        total = sum(
            checkpoint(_label_sum, lm_head, rows_chunk, targets_chunk, use_reentrant=False)
            for rows_chunk, targets_chunk in zip(
                rows.split(chunk_size), targets.split(chunk_size), strict=True
            )
        )  # ()
    return total / max(count, 1)  # ()
