"""The chunked LM-head loss (losses/masked_lm.py) against full logits and F.cross_entropy.

LinearCrossEntropy computes the projection's gradients in the forward pass; these tests hold its loss
and every gradient (hidden states, transform, projection weight and bias) to the plain path's, in fp32
and under bf16 autocast, and check that heads of unknown layout fall back to recomputed chunks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForMaskedLM, BertConfig

from chuxin_ray.losses.masked_lm import IGNORE_INDEX, masked_lm_loss, split_lm_head
from chuxin_ray.models.tiny import tiny_xlmr_config

VOCAB, HIDDEN = 50, 16


def head_of(layout: str) -> nn.Module:
    torch.manual_seed(0)
    if layout == "roberta":
        config = tiny_xlmr_config(VOCAB, hidden=HIDDEN, heads=2, intermediate=32)
        return AutoModelForMaskedLM.from_config(config).lm_head
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=2, intermediate_size=32)
    return AutoModelForMaskedLM.from_config(config).cls


def inputs(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 9, HIDDEN, generator=g)  # (B, L, H)
    labels = torch.randint(0, VOCAB, (4, 9), generator=g)  # (B, L)
    labels[torch.rand(4, 9, generator=g) < 0.4] = IGNORE_INDEX
    return hidden, labels


def loss_and_grads(head: nn.Module, hidden: torch.Tensor, compute) -> tuple[torch.Tensor, dict]:
    head.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_(True)
    loss = compute(hidden)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in head.named_parameters()}
    return loss.detach(), {"hidden": hidden.grad, **grads}


def graph_names(tensor: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("layout", ["roberta", "bert"])
def test_split_head_equals_head(layout: str):
    head = head_of(layout)
    split = split_lm_head(head)
    assert split is not None and split.layout == layout
    hidden, _ = inputs()
    torch.testing.assert_close(split(hidden), head(hidden))


@pytest.mark.parametrize("layout", ["roberta", "bert"])
@pytest.mark.parametrize("chunk_size", [1, 4, 17, 1000])  # 1000: all rows in one chunk
def test_linear_cross_entropy_matches_full_logits(layout: str, chunk_size: int):
    head = head_of(layout)
    split = split_lm_head(head)
    hidden, labels = inputs()
    assert labels.ne(IGNORE_INDEX).sum() > 17

    def plain(h):
        return F.cross_entropy(head(h).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    def chunked(h):
        loss = masked_lm_loss(h, labels, split, chunk_size)
        assert "LinearCrossEntropyBackward" in graph_names(loss)
        return loss

    ref_loss, ref_grads = loss_and_grads(head, hidden, plain)
    loss, grads = loss_and_grads(head, hidden, chunked)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_linear_cross_entropy_under_bf16_autocast_matches_recomputed_chunks():
    """The same bf16 products as the checkpointed path (a head it does not split), up to summation order."""
    head = head_of("roberta")
    hidden, labels = inputs(seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = loss_and_grads(head, hidden, lambda h: masked_lm_loss(h, labels, head, 4))
        loss, grads = loss_and_grads(
            head, hidden, lambda h: masked_lm_loss(h, labels, split_lm_head(head), 4)
        )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-3)
    for name, grad in grads.items():
        assert grad.dtype == ref_grads[name].dtype, name
        scale = ref_grads[name].abs().max()
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=0.03 * scale, msg=name)


def test_without_grad_the_split_head_runs_plain_chunks():
    head = head_of("bert")
    hidden, labels = inputs()
    with torch.no_grad():
        loss = masked_lm_loss(hidden, labels, split_lm_head(head), 4)
        full = F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, full)


class ScaledHead(nn.Module):
    """RoBERTa's layout, another forward: the split must not be trusted."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.dense, self.layer_norm, self.decoder = head.dense, head.layer_norm, head.decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.decoder(self.layer_norm(self.dense(x)))


def test_heads_of_unknown_layout_are_not_split():
    assert split_lm_head(nn.Linear(HIDDEN, VOCAB)) is None
    assert split_lm_head(nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, VOCAB))) is None
    assert split_lm_head(ScaledHead(head_of("roberta"))) is None


def test_no_labelled_position_gives_zero_loss_and_zero_gradients():
    """DDP needs every parameter to get a gradient, even from a batch with nothing to predict."""
    head = head_of("roberta")
    hidden, labels = inputs()
    loss, grads = loss_and_grads(
        head,
        hidden,
        lambda h: masked_lm_loss(h, torch.full_like(labels, IGNORE_INDEX), split_lm_head(head), 4),
    )
    assert loss.item() == 0.0
    assert set(grads) == {"hidden", *(name for name, _ in head.named_parameters())}
    assert all(grad is not None and not grad.any() for grad in grads.values())
