"""The shared training loop on a toy model, in Ray Train's local mode (no Ray cluster, one process):
schedule, optimizer groups, gradient accumulation against one large batch, the stop hook, and a
checkpoint round trip that continues bit for bit."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

from chuxin_ray import storage
from chuxin_ray.config import TrainingConfig
from chuxin_ray.train import checkpoint, loop
from chuxin_ray.train.data import DataPosition

DIM = 6


@dataclass
class ToyBatch:
    x: torch.Tensor  # (B, DIM)
    y: torch.Tensor  # (B,)
    position: DataPosition
    rows: list[str] | None = None

    @property
    def samples(self) -> int:
        return self.x.size(0)

    tokens = samples
    slots = samples

    def to(self, device: torch.device) -> ToyBatch:
        return replace(self, x=self.x.to(device), y=self.y.to(device))


class Toy(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(DIM, 16)
        self.norm = nn.LayerNorm(16)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.norm(torch.relu(self.hidden(x))))).squeeze(-1)  # (B,)


def toy_step(model: nn.Module, batch: ToyBatch, context: loop.StepContext) -> loop.StepOutput:
    error = (model(batch.x) - batch.y).pow(2)  # (B,)
    return loop.StepOutput(error.mean(), {"max_error": error.max()})


DATA = torch.Generator().manual_seed(1)
X = torch.randn(64, DIM, generator=DATA)  # (N, DIM)
Y = X.sum(-1) + 0.1 * torch.randn(64, generator=DATA)  # (N,)


def toy_batches(batch_size: int):
    def stream(start: DataPosition):
        per_epoch = len(X) // batch_size
        epoch, index = start.epoch, start.batch
        while True:
            rows = slice(index * batch_size, (index + 1) * batch_size)
            yield ToyBatch(X[rows], Y[rows], DataPosition(epoch, index), [f"{epoch}:{index}"])
            epoch, index = (epoch + 1, 0) if index + 1 == per_epoch else (epoch, index + 1)

    return stream


def run_local(cfg: TrainingConfig, task: loop.TrainTask, tmp_path) -> dict:
    """loop.train inside a Ray Train worker of local mode (ScalingConfig(num_workers=0): same process)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        lambda _: loop.train(cfg, task),
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(name="toy", storage_path=str(tmp_path / "ray")),
    )
    return trainer.fit().return_value


def training(**overrides) -> TrainingConfig:
    values = dict(steps=6, lr=0.05, warmup_ratio=0.0, max_grad_norm=0.5, checkpoint_every=100, seed=3)
    return TrainingConfig(**{**values, **overrides})


def test_linear_schedule_warms_up_then_decays_to_zero():
    factor = loop.linear_schedule(steps=10, warmup_ratio=0.2)
    assert [factor(s) for s in range(11)] == pytest.approx(
        [0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0]
    )
    assert loop.linear_schedule(steps=4, warmup_ratio=0.0)(0) == 1.0


def test_optimizer_decays_matrices_only():
    optimizer = loop.build_optimizer(Toy(), training(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and {p.ndim for p in decay["params"]} == {2}
    assert no_decay["weight_decay"] == 0.0 and {p.ndim for p in no_decay["params"]} == {1}


def test_fused_optimizer_steps_equal_the_plain_adamw():
    """The fused AdamW the loop uses (DDP, one process) against the per-op reference implementation."""
    cfg = training(weight_decay=0.1)
    models = {"fused": Toy(), "plain": Toy()}
    optimizers = {
        "fused": loop.build_optimizer(models["fused"], cfg),
        "plain": loop.build_optimizer(models["plain"], cfg, fused=False),
    }
    assert optimizers["fused"].defaults["fused"] and not optimizers["plain"].defaults["fused"]
    for step in range(5):
        rows = slice(step * 8, step * 8 + 8)
        for name, model in models.items():
            (model(X[rows]) - Y[rows]).pow(2).mean().backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
    for fused, plain in zip(models["fused"].parameters(), models["plain"].parameters(), strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)
    assert not loop.build_optimizer(Toy(), training(strategy="fsdp", workers=2)).defaults["fused"]


def test_grad_accumulation_equals_one_large_batch(tmp_path):
    """4 rows as 2 micro-batches of 2 with accumulation == 4 rows at once: same loss, same weights."""
    results = {}
    for name, batch_size, accumulation in (("accumulated", 2, 2), ("whole", 4, 1)):
        exported = {}
        dest = storage.resolve(str(tmp_path / name / "metrics.jsonl"))
        task = loop.TrainTask(
            model=Toy(),
            model_step=toy_step,
            batches=toy_batches(batch_size),
            export=exported.update,
            metrics_dest=dest,
        )
        summary = run_local(training(grad_accumulation=accumulation), task, tmp_path / name)
        history = [json.loads(line) for line in storage.read_bytes(dest).decode().splitlines()]
        results[name] = (summary, exported, history)

    (summary, accumulated, history), (_, whole, whole_history) = results["accumulated"], results["whole"]
    assert summary == {"step": 6, "stopped": False, "session": 1, "resumed_from": None}
    assert [r["step"] for r in history] == list(range(1, 7)) and all(r["samples"] == 4 for r in history)
    assert not any("rows" in r for r in history)  # record_rows off
    for a, b in zip(history, whole_history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert history[-1]["loss"] < history[0]["loss"]
    assert any(r["grad_norm"] > 0.5 for r in history)  # clipping was active
    assert accumulated.keys() == whole.keys()
    for key in accumulated:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-5, atol=1e-6)


class LookupToy(nn.Module):
    """Two lookups in one table per step, as queries and passages in a contrastive step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, DIM, padding_idx=1)
        self.out = nn.Linear(2 * DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x.abs() * 40).long() % 100  # (B, DIM) token ids
        first, second = self.embed(ids[:, :3]).mean(1), self.embed(ids[:, 3:]).mean(1)  # (B, DIM) each
        return self.out(torch.cat([first, second], -1)).squeeze(-1)  # (B,)


def test_sparse_lookup_gradients_train_like_dense_ones(tmp_path):
    """Token tables named in sparse_grad_params get sparse lookup gradients added into a kept dense
    buffer: the same weights as the plain dense gradients, with accumulation and weight decay."""
    assert ((X.abs() * 40).long() % 100 == 1).any()  # the padding row is looked up (and gets no gradient)
    exported = {}
    for name, tables in (("dense", ()), ("sparse", ("embed.weight",))):
        exported[name], model = {}, LookupToy()
        task = loop.TrainTask(
            model=model,
            model_step=toy_step,
            batches=toy_batches(4),
            export=exported[name].update,
            sparse_grad_params=tables,
        )
        run_local(training(grad_accumulation=2, weight_decay=0.1), task, tmp_path / name)
        assert model.embed.sparse == bool(tables)
    assert exported["sparse"].keys() == exported["dense"].keys()
    for key, dense in exported["dense"].items():
        torch.testing.assert_close(exported["sparse"][key], dense, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(exported["dense"]["embed.weight"], LookupToy().embed.weight.detach())


def test_stop_after_steps_ends_early_without_export(tmp_path):
    exported = {}
    task = loop.TrainTask(model=Toy(), model_step=toy_step, batches=toy_batches(4), export=exported.update)
    summary = run_local(training(stop_after_steps=2), task, tmp_path)
    assert summary == {"step": 2, "stopped": True, "session": 1, "resumed_from": None}
    assert exported == {}


@pytest.mark.parametrize(("every", "reported"), [(0.0, [1, 2, 3, 4, 5, 6]), (1e9, [6])])
def test_metrics_reach_ray_train_at_the_configured_interval(every, reported, tmp_path, monkeypatch):
    """Each report waits for the controller's poll, so metrics go to Ray Train every `report_every_s`
    seconds, not every step; the last step's checkpoint is always reported, and metrics.jsonl has
    every step either way."""
    import ray.train

    steps, real_report = [], ray.train.report

    def recording_report(metrics, *args, **kwargs):
        steps.append(metrics["step"])
        return real_report(metrics, *args, **kwargs)

    monkeypatch.setattr(ray.train, "report", recording_report)
    dest = storage.resolve(str(tmp_path / "metrics.jsonl"))
    task = loop.TrainTask(model=Toy(), model_step=toy_step, batches=toy_batches(4), metrics_dest=dest)
    run_local(training(report_every_s=every), task, tmp_path)
    assert steps == reported
    assert len(storage.read_bytes(dest).decode().splitlines()) == 6


def test_checkpoint_round_trip_continues_bit_for_bit(tmp_path):
    """4 steps straight == 2 steps, save, load into a fresh model and optimizer with a moved RNG, 2 steps.
    Dropout makes the RNG state part of what must come back."""

    def steps(model, optimizer, rows):
        for start in rows:
            batch = ToyBatch(X[start : start + 4], Y[start : start + 4], DataPosition())
            loss = toy_step(model, batch, loop.StepContext(step=1, loss_scale=1.0, no_sync=None)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    def fresh():
        model = Toy(dropout=0.3).train()
        return model, torch.optim.AdamW(model.parameters(), lr=0.01)

    torch.manual_seed(11)
    straight, optimizer = fresh()
    torch.manual_seed(11)
    steps(straight, optimizer, [0, 4, 8, 12])

    torch.manual_seed(11)
    first, optimizer = fresh()
    torch.manual_seed(11)
    steps(first, optimizer, [0, 4])
    history = [{"step": 1}, {"step": 2}]
    checkpoint.save(tmp_path, first, optimizer, {"step": 2}, rank=0, history=history)

    torch.manual_seed(999)
    resumed, optimizer = fresh()
    state, loaded_history = checkpoint.load(tmp_path, resumed, optimizer, rank=0)
    assert state == {"step": 2} and loaded_history == history
    steps(resumed, optimizer, [8, 12])
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
