"""Masked-LM cross-entropy computed only at labelled positions.

Used twice by RetroMAE (Xiao et al. 2022, "RetroMAE: Pre-Training Retrieval-oriented Language Models Via
Masked Auto-Encoder", arXiv:2205.12035): for the encoder's MLM loss and for the enhanced decoder's
reconstruction loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import gelu

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index and HF's label convention


class SplitHead(NamedTuple):
    """An LM head seen as its two parts: a transform (N, H) -> (N, H), then the vocabulary projection.

    `layout` names where the parts are: "bert" (`predictions.transform`, `predictions.decoder`) or
    "roberta" (`dense`, gelu, `layer_norm`; `decoder`, as RoBERTa and XLM-R). Holds the head, not its parts, so a copied model's SplitHead
    built from the copy's head uses the copy's parameters."""

    head: nn.Module
    layout: str

    @property
    def projection(self) -> nn.Linear:  # weight (V, H), bias (V,) or None
        return self.head.predictions.decoder if self.layout == "bert" else self.head.decoder

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.layout == "bert":
            return self.head.predictions.transform(hidden)  # (N, H)
        return self.head.layer_norm(gelu(self.head.dense(hidden)))  # (N, H)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.projection(self.transform(hidden))  # (N, V)


def split_lm_head(head: nn.Module) -> SplitHead | None:
    """The head as a SplitHead where its layout is one of SplitHead's; None for any other head.

    The split is checked against the head's own forward on two random rows, so a head with one of
    these layouts but another forward is not split wrongly: it gets None, and masked_lm_loss chunks
    it whole."""
    predictions = getattr(head, "predictions", None)
    if predictions is not None and hasattr(predictions, "transform"):
        split = SplitHead(head, "bert")
    elif all(isinstance(getattr(head, n, None), nn.Module) for n in ("dense", "layer_norm", "decoder")):
        split = SplitHead(head, "roberta")
    else:
        return None
    weight = getattr(split.projection, "weight", None)
    if not isinstance(split.projection, nn.Linear) or weight.is_meta:
        return None
    with torch.no_grad():
        probe = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0))
        probe = probe.to(device=weight.device, dtype=weight.dtype)  # (2, H)
        if not torch.allclose(split(probe), head(probe), rtol=1e-4, atol=1e-5):
            return None
    return split


def _label_sum(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    logits = head(hidden)  # (N, V)
    return F.cross_entropy(logits.float(), labels, reduction="sum")  # ()


class LinearCrossEntropy(torch.autograd.Function):
    """sum_n CE(rows[n] @ weight.T + bias, targets[n]), `chunk_size` rows of logits at a time.

    The gradients are computed in the forward pass, chunk by chunk: d(sum)/d(logits) = softmax - onehot,
    then rows' gradient = that @ weight and weight's += that.T @ rows. So no logits are kept for the
    backward pass and none are recomputed: the FLOPs of one forward and backward, with at most
    chunk_size x V logits alive. The backward pass only scales the stored gradients.

    Under autocast the matrix products run in the autocast dtype, as F.linear would, and the softmax in
    fp32; the weight's and bias's gradients accumulate in their own dtype (fp32 master weights).
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_size):
        """rows (N, H), weight (V, H), bias (V,) or None, targets (N,) -> () the summed CE."""
        device = rows.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else rows.dtype
        with torch.autocast(device, enabled=False):
            x = rows.to(dtype)  # (N, H)
            w = weight.to(dtype)  # (V, H)
            b = bias.to(dtype) if bias is not None else None  # (V,)
            grad_rows = torch.empty_like(rows)  # (N, H)
            grad_weight = torch.zeros_like(weight) if weight.requires_grad else None  # (V, H)
            grad_bias = torch.zeros_like(bias) if bias is not None and bias.requires_grad else None  # (V,)
            total = torch.zeros((), dtype=torch.float32, device=rows.device)
            for start in range(0, x.shape[0], chunk_size):
                xc, tc = x[start : start + chunk_size], targets[start : start + chunk_size]  # (n, H), (n,)
                # One fused kernel from the dtype's logits to fp32 log-probabilities, then the softmax in
                # place: the fewest passes over the (n, V) block (logsumexp would add several).
                log_probs = torch.log_softmax(F.linear(xc, w, b), dim=1, dtype=torch.float32)  # (n, V)
                total -= log_probs.gather(1, tc[:, None]).sum()
                grad_logits = log_probs.exp_()  # (n, V) softmax
                grad_logits[torch.arange(len(tc), device=tc.device), tc] -= 1.0  # softmax - onehot
                g = grad_logits.to(dtype)  # (n, V) as autocast's backward would have it
                if grad_bias is not None:
                    grad_bias += g.sum(0, dtype=torch.float32)  # (V,) reads the smaller copy
                grad_rows[start : start + chunk_size] = g @ w  # (n, H)
                if grad_weight is not None:
                    grad_weight += g.t() @ xc  # (V, H)
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_rows, grad_weight, grad_bias = ctx.saved_tensors
        scaled = [None if g is None else g * grad_total for g in (grad_rows, grad_weight, grad_bias)]
        return *scaled, None, None


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
    to (N, V) logits (the model's whole MLM head, transform included; a `SplitHead` where its parts are
    known). chunk_size None: the plain path, F.cross_entropy over all N rows' logits under autograd.
    chunk_size set: at most chunk_size x V logits are alive at once. A `SplitHead` runs its transform
    on all N rows and the projection through LinearCrossEntropy, which computes the gradients in the
    forward pass: no extra FLOPs, and fewer passes over the logits than autograd's cross-entropy (CPU
    bench: faster than the plain path even in one chunk). Any other head runs `chunk_size` rows at a
    time under activation checkpointing, for ~1/3 more head FLOPs (the forward is recomputed).

    With no labelled position the loss is 0 and still depends on the head (every parameter gets a zero
    gradient, which DDP needs). The boolean gather syncs with the device once (N is data-dependent).
    """
    selected = labels.ne(IGNORE_INDEX)  # (B, L)
    rows = hidden[selected]  # (N, H)
    targets = labels[selected]  # (N,)
    count = targets.numel()
    if chunk_size is not None and isinstance(lm_head, SplitHead) and torch.is_grad_enabled():
        projection = lm_head.projection
        total = LinearCrossEntropy.apply(
            lm_head.transform(rows), projection.weight, projection.bias, targets, chunk_size
        )  # ()
    elif chunk_size is None or count <= chunk_size:
        total = _label_sum(lm_head, rows, targets)  # ()
    else:
        total = sum(
            checkpoint(_label_sum, lm_head, rows_chunk, targets_chunk, use_reentrant=False)
            for rows_chunk, targets_chunk in zip(
                rows.split(chunk_size), targets.split(chunk_size), strict=True
            )
        )  # ()
    return total / max(count, 1)  # ()
