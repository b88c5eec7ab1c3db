"""CPU dropout (models/cpu_dropout.py) against HF's SDPA attention and nn.Dropout, the plain paths."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import XLMRobertaModel

from chuxin_ray.models.cpu_dropout import (
    BITS,
    CpuDropout,
    CpuDropoutSelfAttention,
    bit_dropout,
    keep_scale,
    random_bits,
    use_cpu_dropout,
)
from chuxin_ray.models.tiny import tiny_xlmr_config


def models(attention_dropout: float):
    torch.manual_seed(0)
    plain = XLMRobertaModel(
        tiny_xlmr_config(300, hidden=32, heads=4, dropout=0.0, attn_implementation="sdpa"),
        add_pooling_layer=False,
    )
    fast = copy.deepcopy(plain)
    assert use_cpu_dropout(fast) == 9  # per layer: the attention and 3 dropouts; the embeddings' dropout
    for module in fast.modules():
        if isinstance(module, CpuDropoutSelfAttention):
            module.dropout_prob = attention_dropout
    return plain, fast


def batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (6, 20))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # padded rows: the additive mask path
    mask[4, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_training_path_equals_sdpa_when_nothing_is_dropped():
    # p = 1e-6 rounds to a threshold of 0: the fast path runs (training, p > 0) but drops nothing.
    plain, fast = models(attention_dropout=1e-6)
    plain.train(), fast.train()
    out_plain = plain(**batch()).last_hidden_state
    out_fast = fast(**batch()).last_hidden_state
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    weights = torch.randn(out_plain.shape)  # a loss whose gradient reaches every parameter
    (out_plain * weights).sum().backward()
    (out_fast * weights).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_eval_mode_is_sdpa_and_the_saved_model_is_unchanged(tmp_path):
    plain, fast = models(attention_dropout=0.1)
    plain.eval(), fast.eval()
    torch.testing.assert_close(fast(**batch()).last_hidden_state, plain(**batch()).last_hidden_state)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    fast.save_pretrained(tmp_path)
    loaded = XLMRobertaModel.from_pretrained(tmp_path, add_pooling_layer=False)
    assert not any(isinstance(m, CpuDropoutSelfAttention) for m in loaded.modules())


def test_training_drops_attention_like_dropout():
    plain, fast = models(attention_dropout=0.5)
    fast.train()
    torch.manual_seed(2)
    first = fast(**batch()).last_hidden_state
    torch.manual_seed(2)
    assert torch.equal(fast(**batch()).last_hidden_state, first)  # the mask follows torch's seed
    assert not torch.allclose(first, plain.train()(**batch()).last_hidden_state, atol=1e-3)


def test_attention_dropout_equals_dropout_applied_to_the_probabilities():
    """The optimised attention (scores scaled through q, the mask applied unscaled, probs @ v scaled)
    against the plain definition, softmax(q k^T / sqrt(d) + mask) -> dropout -> @ v, with the same mask."""
    _, fast = models(attention_dropout=0.3)
    attention = fast.encoder.layer[0].attention.self.train()
    hidden = torch.randn(6, 20, 32)  # (B, L, H*D)
    additive = torch.zeros(6, 1, 20, 20)
    additive[1, :, :, 12:] = torch.finfo(torch.float32).min  # row 1 has 12 real tokens
    torch.manual_seed(5)
    out, _ = attention(hidden, attention_mask=additive)

    def heads(x):  # (B, L, H*D) -> (B, H, L, D)
        return x.view(6, 20, 4, 8).transpose(1, 2)

    q, k, v = (heads(layer(hidden)) for layer in (attention.query, attention.key, attention.value))
    probs = (q @ k.transpose(-1, -2) / 8**0.5 + additive).softmax(-1)  # (B, H, L, L)
    torch.manual_seed(5)
    drop = random_bits(probs.shape, probs.device) < round(0.3 * 2**BITS)
    expected = (probs.masked_fill(drop, 0.0) * keep_scale(0.3)) @ v  # (B, H, L, D)
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(6, 20, 32), rtol=1e-5, atol=1e-6)


def test_random_bits_are_15_uniform_bits_in_both_halves_of_a_draw():
    torch.manual_seed(0)
    bits = random_bits((999, 1001), torch.device("cpu"))  # an odd count: the last draw is half used
    assert bits.shape == (999, 1001) and bits.dtype == torch.int16
    flat = bits.flatten().long()
    assert flat.min() >= 0 and flat.max() < 2**BITS
    for half in (flat[0::2], flat[1::2]):  # the low and the high 16 bits of each int32
        assert abs(half.float().mean().item() / (2**BITS - 1) - 0.5) < 0.003
        assert abs((half < 2**BITS // 10).float().mean().item() - 0.1) < 0.002
    assert not torch.equal(flat[0::2][:1000], flat[1::2][:1000])


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_bit_dropout_keeps_the_expectation_and_its_gradient_is_the_mask(p):
    torch.manual_seed(0)
    x = torch.full((1_000_000,), 2.0, requires_grad=True)
    y = bit_dropout(x, p)
    dropped = (y == 0).float().mean().item()
    p_used = round(p * 2**BITS) / 2**BITS
    assert abs(dropped - p_used) < 0.002 and abs(p_used - p) < 2**-BITS
    assert abs(y.mean().item() - 2.0) < 0.01  # unbiased: kept values scaled by 1 / (1 - p_used)
    assert y.unique().tolist() == pytest.approx([0.0, 2.0 / (1 - p_used)])
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() / (1 - p_used))


def test_dropout_modules_drop_in_training_only():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.25))
    assert use_cpu_dropout(layer) == 1 and isinstance(layer[1], CpuDropout)
    x = torch.ones(2000, 4)
    assert torch.equal(layer.eval()(x), layer[0](x))
    out = layer.train()[1](x)
    assert abs((out == 0).float().mean().item() - 0.25) < 0.02 and abs(out.mean().item() - 1.0) < 0.03
