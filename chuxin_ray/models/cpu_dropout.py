"""Dropout that is cheap on CPU, for training XLM-R encoders there: in attention and between layers.

On CPU, torch's SDPA with dropout runs its math path and draws the mask with `bernoulli_`, then
multiplies and divides by the keep probability in separate passes: for the (batch, heads, L, L)
probabilities of a batch of 128-token passages that costs several times the attention itself
(bench/finetune.py). Here the mask is 15 random bits per element, two elements from each 32-bit draw
(`random_bits`: 0.75x the time of `int16.random_()`, 0.3x that of `bernoulli_`, on one thread), compared
against a threshold and kept as a bool for backward (1 byte an element, not 4). It is applied with
`torch.where` against a 0-d zero (0.5x the time of `masked_fill`, which copies then fills; multiplying
by a bool tensor casts it element by element). Attention leaves its probabilities unscaled and scales
probs @ v, (B, H, L, D) instead of (B, H, L, L); the scores are scaled through q for the same reason.
The `nn.Dropout` modules between layers use the same function, scaled in place.

p is rounded to a multiple of 2**-15 (0.1 becomes 0.100006) and kept values are scaled by
1 / (1 - that p), so every element keeps its expectation. Everything else is SDPA's arithmetic:
softmax(q k^T / sqrt(d) + mask) v. In eval mode, without dropout, or for anything but plain
self-attention (cross-attention, a cache, head masks, attention outputs) the module is HF's SDPA
attention unchanged. On GPU leave SDPA alone: its fused kernels draw the mask inside the kernel.

`use_cpu_dropout(model)` swaps the class of every XLM-R SDPA self-attention and every `nn.Dropout`
module in place: the parameters, their names and the saved model are untouched.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaSdpaSelfAttention

BITS = 15  # random bits per mask element


def random_bits(shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An int16 tensor of `shape`, each element uniform on [0, 2**15), two elements per 32-bit draw.

    int32.random_() draws uniformly from [0, 2**31): viewed as int16 pairs (little-endian) the low half
    holds 16 random bits and the high half 15; clearing the low half's top bit leaves 15 in each."""
    count = math.prod(shape)
    words = torch.empty((count + 1) // 2, dtype=torch.int32, device=device).random_()
    return words.view(torch.int16)[:count].bitwise_and_(2**BITS - 1).view(shape)


def drop_threshold(p: float) -> int:
    """Elements whose random bits fall below this are dropped: p rounded to the mask's resolution."""
    return round(p * 2**BITS)


def keep_scale(p: float) -> float:
    """1 / (1 - p) for the p the mask draws at: what keeps each element's expectation."""
    return 2**BITS / (2**BITS - drop_threshold(p))


class BitDropout(torch.autograd.Function):
    """Zero where 15 random bits < drop_threshold(p). `scaled`: times keep_scale(p), else the caller
    scales something downstream (attention scales probs @ v rather than the probabilities)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, scaled: bool = True) -> torch.Tensor:
        drop = random_bits(x.shape, x.device) < drop_threshold(p)  # bool
        ctx.scale = keep_scale(p) if scaled else None
        ctx.save_for_backward(drop)
        out = torch.where(drop, x.new_zeros(()), x)  # a 0-d tensor: faster than the Python scalar 0.0
        return out.mul_(ctx.scale) if scaled else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (drop,) = ctx.saved_tensors
        out = torch.where(drop, grad.new_zeros(()), grad)
        return (out if ctx.scale is None else out.mul_(ctx.scale)), None, None


def bit_dropout(x: torch.Tensor, p: float, scaled: bool = True) -> torch.Tensor:
    return BitDropout.apply(x, p, scaled)


class CpuDropoutSelfAttention(XLMRobertaSdpaSelfAttention):
    """XLM-R SDPA self-attention; in training, its probabilities go through `bit_dropout`."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        past_key_values=None,
        output_attentions: bool | None = False,
        cache_position: torch.Tensor | None = None,
        **kwargs,
    ):
        plain = (
            not self.training
            or self.dropout_prob == 0.0
            or self.is_decoder
            or self.position_embedding_type != "absolute"
            or encoder_hidden_states is not None
            or past_key_values is not None
            or output_attentions
            or head_mask is not None
        )
        if plain:
            return super().forward(
                hidden_states,
                attention_mask,
                head_mask,
                encoder_hidden_states,
                past_key_values,
                output_attentions,
                cache_position,
                **kwargs,
            )
        batch, length, _ = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, H*D) -> (B, H, L, D)
            return x.view(batch, length, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

        query = heads(self.query(hidden_states)) * self.attention_head_size**-0.5  # (B, H, L, D)
        key = heads(self.key(hidden_states))
        value = heads(self.value(hidden_states))
        scores = query @ key.transpose(-1, -2)  # (B, H, L, L)
        if attention_mask is not None:  # SDPA's: additive float (B, 1, L|1, L), or bool (True = attend)
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores.add_(attention_mask)  # in place: matmul's backward keeps its inputs
        probs = bit_dropout(scores.softmax(dim=-1), self.dropout_prob, scaled=False)  # (B, H, L, L)
        out = (probs @ value).mul_(keep_scale(self.dropout_prob))  # (B, H, L, D)
        return out.transpose(1, 2).reshape(batch, length, self.all_head_size), None  # (B, L, H*D)


class CpuDropout(nn.Dropout):
    """nn.Dropout through `bit_dropout` in training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return bit_dropout(x, self.p)


def use_cpu_dropout(model: nn.Module) -> int:
    """Make every XLM-R SDPA self-attention in `model` a CpuDropoutSelfAttention and every
    nn.Dropout a CpuDropout; returns how many modules changed."""
    swapped = 0
    for module in model.modules():
        if type(module) is XLMRobertaSdpaSelfAttention:
            module.__class__ = CpuDropoutSelfAttention
            swapped += 1
        elif type(module) is nn.Dropout and not module.inplace:
            module.__class__ = CpuDropout
            swapped += 1
    return swapped
