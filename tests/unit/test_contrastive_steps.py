"""The finetune and unified model steps: through GradCache (the optimised path) they give the loss and
gradients of the plain step, with and without teacher scores."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from chuxin_ray.losses.contrastive import ContrastiveLoss
from chuxin_ray.losses.infonce import InfoNCELoss
from chuxin_ray.losses.unified import UnifiedLoss
from chuxin_ray.models.m3 import M3Embedder, M3Heads
from chuxin_ray.models.m3_folder import DenseEmbedder
from chuxin_ray.models.tiny import tiny_xlmr_config
from chuxin_ray.stages.finetune import DenseStep
from chuxin_ray.stages.unified import M3Step
from chuxin_ray.train.data import DataPosition
from chuxin_ray.train.loop import StepContext
from chuxin_ray.train.pair_batches import PairBatch

B, G, VOCAB = 4, 3, 120


def make_batch(teacher: bool) -> PairBatch:
    gen = torch.Generator().manual_seed(0)

    def texts(n: int, length: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(4, VOCAB, (n, length), generator=gen)  # (n, L)
        lengths = torch.randint(3, length + 1, (n,), generator=gen)  # (n,)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()  # (n, L)
        ids[:, 0] = 0
        return {"input_ids": torch.where(mask.bool(), ids, 1), "attention_mask": mask}

    scores = torch.rand(B, G, generator=gen) if teacher else None
    return PairBatch(texts(B, 9), texts(B * G, 16), scores, DataPosition())


def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModel.from_config(tiny_xlmr_config(VOCAB, dropout=0.0), add_pooling_layer=False)


def grads(model: torch.nn.Module, step, batch: PairBatch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = step(model, batch, StepContext(step=5, loss_scale=0.5, no_sync=None))
    if not out.backward_done:
        (out.loss * 0.5).backward()
    return float(out.loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(plain, cached):
    assert cached[0] == pytest.approx(plain[0], rel=1e-5)
    assert plain[1].keys() == cached[1].keys()
    for name, grad in plain[1].items():
        torch.testing.assert_close(cached[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("teacher", [False, True])
def test_dense_step_grad_cache_equals_plain(teacher):
    model = DenseEmbedder(encoder())
    batch = make_batch(teacher)

    def step(chunk):
        return DenseStep(InfoNCELoss(0.05), ContrastiveLoss("kl"), 0.05, G, chunk)

    assert_same(grads(model, step(None), batch), grads(model, step(3), batch))


@pytest.mark.parametrize(("teacher", "in_batch"), [(False, True), (True, True), (True, False)])
def test_m3_step_grad_cache_equals_plain(teacher, in_batch):
    torch.manual_seed(1)
    model = M3Embedder(encoder(), M3Heads(32, zeroed_token_ids=[0, 1, 2, 3]))
    batch = make_batch(teacher)

    def step(chunk):
        return M3Step(
            InfoNCELoss(0.05, in_batch_negatives=in_batch),
            UnifiedLoss(temperature=0.05, kd_loss="m3_kd"),
            G,
            in_batch,
            chunk,
        )

    plain, cached = grads(model, step(None), batch), grads(model, step(5), batch)
    assert_same(plain, cached)
    assert {"colbert_linear.weight", "sparse_linear.weight"} <= {n.removeprefix("heads.") for n in plain[1]}
