"""GradCache against the plain big-batch backward on a tiny XLM-R encoder, with dropout on."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from transformers import XLMRobertaConfig, XLMRobertaModel

from chuxin_ray.losses.infonce import InfoNCELoss
from chuxin_ray.losses.unified import UnifiedLoss
from chuxin_ray.models.m3 import M3Embedder, M3Heads, m3_scores
from chuxin_ray.train import grad_cache
from chuxin_ray.train.grad_cache import grad_cache_backward

QUERIES, GROUP, CHUNK = 4, 3, 3  # 4 queries, 12 passages, chunks of 3 rows: uneven last chunk on both


def _encoder(dropout: float, device: str = "cpu") -> XLMRobertaModel:
    torch.manual_seed(0)
    config = XLMRobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return XLMRobertaModel(config, add_pooling_layer=False).to(device).train()


def _batch(rows: int, length: int, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 30, (rows, length), generator=generator)  # (R, L)
    lengths = torch.randint(3, length + 1, (rows,), generator=generator)  # (R,)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # (R, L)
    ids[:, 0] = 0
    ids[mask == 0] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _inputs(device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    return [_batch(QUERIES, 8, 1, device), _batch(QUERIES * GROUP, 12, 2, device)]


def _dense(model: XLMRobertaModel):
    return lambda chunk: F.normalize(model(**chunk).last_hidden_state[:, 0], dim=-1)  # (R, H)


def _plain(encode, batches, loss_fn, chunk_sizes: list[int]) -> torch.Tensor:
    """The whole batch's graph in memory, encoded in the same chunks (so with the same dropout draws)."""
    reps = []
    for batch, size in zip(batches, chunk_sizes, strict=True):
        outs = [encode(chunk) for chunk in grad_cache._chunks(batch, size)]
        if isinstance(outs[0], torch.Tensor):
            reps.append(torch.cat(outs))
        else:
            reps.append(type(outs[0])(*(torch.cat(parts) for parts in zip(*outs, strict=True))))
    loss = loss_fn(*reps)
    loss.backward()
    return loss.detach()


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    grads = [param.grad.clone() for param in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same(loss_a, grads_a, loss_b, grads_b) -> None:
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dropout_is_on_so_the_rng_replay_matters():
    model = _encoder(dropout=0.1)
    batch = _inputs()[0]
    assert not torch.equal(_dense(model)(batch), _dense(model)(batch))


def test_grad_cache_equals_full_batch_without_dropout():
    model = _encoder(dropout=0.0)
    loss_fn = InfoNCELoss()
    batches = _inputs()
    queries = _dense(model)(batches[0])  # (B, H), one forward for the whole batch
    passages = _dense(model)(batches[1])  # (B*G, H)
    full = loss_fn(queries, passages)
    full.backward()
    full_grads = _grads(model)
    cached = grad_cache_backward(_dense(model), batches, loss_fn, chunk_size=CHUNK)
    _assert_same(cached, _grads(model), full.detach(), full_grads)


def test_grad_cache_equals_big_batch_with_dropout():
    model = _encoder(dropout=0.1)
    loss_fn = InfoNCELoss()
    batches = _inputs()
    torch.manual_seed(123)
    plain = _plain(_dense(model), batches, loss_fn, [CHUNK, CHUNK])
    plain_grads = _grads(model)
    after_plain = torch.rand(1)

    torch.manual_seed(123)
    cached = grad_cache_backward(_dense(model), batches, loss_fn, chunk_size=CHUNK)
    _assert_same(cached, _grads(model), plain, plain_grads)
    # the replay leaves the global RNG where the first pass left it, as a plain step would
    assert torch.equal(torch.rand(1), after_plain)


def test_without_rng_replay_the_gradients_differ(monkeypatch):
    model = _encoder(dropout=0.1)
    loss_fn = InfoNCELoss()
    batches = _inputs()
    torch.manual_seed(123)
    _plain(_dense(model), batches, loss_fn, [CHUNK, CHUNK])
    plain_grads = _grads(model)
    monkeypatch.setattr(grad_cache._RngState, "replay", lambda self: contextlib.nullcontext())
    torch.manual_seed(123)
    grad_cache_backward(_dense(model), batches, loss_fn, chunk_size=CHUNK)
    diff = max((a - b).abs().max().item() for a, b in zip(_grads(model), plain_grads, strict=True))
    assert diff > 1e-3


def test_grad_cache_with_m3_heads_and_the_unified_loss():
    """NamedTuple outputs with integer fields (ids, masks), one chunk size per batch, every head's gradient."""
    heads = M3Heads(32, zeroed_token_ids=[0, 1, 2, 3])
    # ReLU of a random Linear is 0 for most tokens: a positive bias keeps the sparse head alive
    torch.nn.init.constant_(heads.sparse_linear.bias, 0.5)
    model = M3Embedder(_encoder(dropout=0.1), heads).train()
    unified = UnifiedLoss()

    def loss_fn(queries, passages):
        scores = m3_scores(queries, passages)
        return unified(scores.dense, scores.sparse, scores.colbert, group_size=GROUP, step=0)

    def encode(chunk):
        return model(**chunk)

    batches, sizes = _inputs(), [2, 5]
    torch.manual_seed(7)
    plain = _plain(encode, batches, loss_fn, sizes)
    plain_grads = _grads(model)
    assert all(grad.abs().sum() > 0 for grad in plain_grads[-4:])  # colbert_linear, sparse_linear
    torch.manual_seed(7)
    cached = grad_cache_backward(encode, batches, loss_fn, chunk_size=sizes)
    _assert_same(cached, _grads(model), plain, plain_grads)


def test_no_sync_wraps_every_replay_but_the_last():
    model = _encoder(dropout=0.0)
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(True)
        yield

    grad_cache_backward(_dense(model), _inputs(), InfoNCELoss(), chunk_size=CHUNK, no_sync=no_sync)
    chunks = -(-QUERIES // CHUNK) + -(-QUERIES * GROUP // CHUNK)  # 2 + 4
    assert len(entered) == chunks - 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grad_cache_equals_big_batch_with_dropout_on_cuda():
    model = _encoder(dropout=0.1, device="cuda")
    loss_fn = InfoNCELoss()
    batches = _inputs("cuda")
    torch.manual_seed(123)
    plain = _plain(_dense(model), batches, loss_fn, [CHUNK, CHUNK])
    plain_grads = _grads(model)
    torch.manual_seed(123)
    cached = grad_cache_backward(_dense(model), batches, loss_fn, chunk_size=CHUNK)
    _assert_same(cached, _grads(model), plain, plain_grads)
