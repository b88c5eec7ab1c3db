"""The Ray Train loop shared by the training stages: a stage passes a model, a model-step function and a
batch stream; the loop owns everything else.

    driver   check_resources(cfg)         fail fast when the cluster cannot place the workers
             fit(train_fn, ...)           TorchTrainer: ScalingConfig, RunConfig(storage), FailureConfig,
                                          the dataset split deterministically (see train/data.py)
    worker   train(cfg, task)             inside train_fn: DDP or FSDP, AdamW + linear warmup/decay,
                                          gradient accumulation and checkpointing, grad-norm clipping,
                                          bf16 autocast on GPU, checkpoints and resume, metrics

A step is `grad_accumulation` micro-batches: forward + backward each (gradient sync only on the last),
then clip, optimizer and scheduler step. Every `checkpoint_every` steps and at the last step all ranks
save a checkpoint (train/checkpoint.py) and hand it to `ray.train.report`; a restarted worker group
(FailureConfig) or a rerun with the same run name loads the latest one through `ray.train.get_checkpoint()`
and continues from its step and data position, so the run ends at `steps` optimizer steps in total.
Between checkpoints, metrics go to `ray.train.report` every `report_every_s` seconds (rank 0's clock,
agreed through the step's all-reduce), since each report waits for the controller's poll. A checkpoint
counts once the controller has collected it (its next poll, within 2 s): a worker group lost before then
resumes from the checkpoint before it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import ray
import ray.train
import torch
import torch.distributed as dist
from torch import nn

from chuxin_ray import storage
from chuxin_ray.config import ConfigError, TrainingConfig
from chuxin_ray.train import checkpoint
from chuxin_ray.train.data import DataPosition
from chuxin_ray.train.prefetch import Prefetched, prefetched
from chuxin_ray.train.sparse_rows import (
    SparseTables,
    all_reduce_rows,
    clip_grad_norm,
    leave_out_of_ddp,
    sparse_lookup_grads,
    zero_grads,
)

log = logging.getLogger(__name__)


class StepOutput(NamedTuple):
    loss: torch.Tensor  # () this micro-batch's loss, the one to backpropagate
    metrics: dict[str, torch.Tensor]  # () values averaged over micro-batches and workers (loss parts)
    backward_done: bool = False  # the step ran its own backward (GradCache), scaled by loss_scale


@dataclass(frozen=True)
class StepContext:
    """What a model step may need to know about the optimizer step it is part of."""

    step: int  # the optimizer step being computed, 1-based
    loss_scale: float  # 1 / grad_accumulation: what a step running its own backward multiplies by
    no_sync: Callable[[], contextlib.AbstractContextManager] | None  # DDP's no_sync, for GradCache


class Batch(Protocol):
    position: DataPosition  # this batch's own position in the stream
    rows: list[str] | None

    @property
    def samples(self) -> int: ...

    @property
    def tokens(self) -> int: ...

    @property
    def slots(self) -> int: ...

    def to(self, device: torch.device) -> Batch: ...


ModelStep = Callable[[nn.Module, Any, StepContext], StepOutput]


@dataclass
class TrainTask:
    """What a stage hands the loop, built inside the worker."""

    model: nn.Module  # unwrapped; the loop moves it to the device and wraps it
    model_step: ModelStep  # forward (and maybe backward) of one micro-batch on the device -> StepOutput
    batches: Callable[[DataPosition], Iterator[Any]]  # micro-batches from a position on, through epochs
    shard_units: Callable[[nn.Module], list[nn.Module]] = field(default=lambda model: [])  # FSDP units
    export: Callable[[dict[str, torch.Tensor]], None] | None = None  # rank 0, full state dict at the end
    metrics_dest: storage.Location | None = None  # metrics.jsonl, rewritten at checkpoints and the end
    config_hash: str = ""
    prefetch: int = 0  # micro-batches made ahead in a thread (train/prefetch.py); 0: made on demand
    # nn.Embedding tables whose gradient is row-sparse (token embeddings): under DDP their lookups add
    # rows into a kept dense gradient, and with >1 worker only the touched rows are all-reduced
    # (train/sparse_rows.py); names as in `model`
    sparse_grad_params: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------


def check_resources(cfg: TrainingConfig, key: str) -> None:
    """Raise ConfigError when the cluster, as it is now, cannot place the workers plus one CPU for Ray
    Data's read tasks (Ray Train reserves the workers' CPUs; with none left the stream never starts and
    the run would wait forever). `key` is the config path of `cfg`, for the message."""
    if not cfg.check_resources:
        return
    total = ray.cluster_resources()
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    problems = []
    for resource, per_worker, name in (
        ("CPU", cfg.cpus_per_worker, "cpus_per_worker"),
        ("GPU", cfg.gpus_per_worker, "gpus_per_worker"),
    ):
        if per_worker <= 0:
            continue
        need, have = cfg.workers * per_worker, total.get(resource, 0.0)
        largest = max((node.get(resource, 0.0) for node in nodes), default=0.0)
        if need > have:
            problems.append(
                f"{key}.workers={cfg.workers} x {key}.{name}={per_worker:g} needs {need:g} {resource}s; "
                f"the Ray cluster has {have:g}"
            )
        elif largest < per_worker:
            problems.append(
                f"{key}.{name}={per_worker:g}: no node has that many {resource}s (largest: {largest:g})"
            )
    spare = total.get("CPU", 0.0) - cfg.workers * cfg.cpus_per_worker
    if not problems and spare < 1:
        problems.append(
            f"{key}.workers={cfg.workers} x {key}.cpus_per_worker={cfg.cpus_per_worker:g} leaves {spare:g} of "
            f"{total.get('CPU', 0.0):g} CPUs for Ray Data's read tasks, which need 1; lower "
            f"{key}.cpus_per_worker (fractions such as 0.5 pack workers) or {key}.workers"
        )
    if problems:
        raise ConfigError(
            "the Ray cluster cannot place this training run:\n  "
            + "\n  ".join(problems)
            + f"\n(set {key}.check_resources=false on an autoscaling cluster that adds nodes on demand)"
        )


def fit(
    train_fn: Callable[[dict], Any],
    train_config: dict,
    cfg: TrainingConfig,
    *,
    key: str,
    run_storage: storage.Location,
    name: str,
    datasets: dict[str, ray.data.Dataset],
) -> ray.train.Result:
    """Check resources, then run `train_fn(train_config)` on `cfg.workers` Ray Train workers.

    Checkpoints go to `run_storage/<name>/`; constructing the trainer with the same storage and name
    again resumes the run from its latest checkpoint."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_resources(cfg, key)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker > 0:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=train_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=run_storage.path,
            storage_filesystem=run_storage.fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets=datasets,
        # preserve_order: blocks reach the splits in a fixed order, so a resumed worker re-reads exactly
        # the stream it had (locality hints would make the order depend on where blocks happen to be).
        dataset_config=DataConfig(
            execution_options=ExecutionOptions(preserve_order=True), enable_shard_locality=False
        ),
    )
    return trainer.fit()


# --------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------


def linear_schedule(steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR factor: 0 -> 1 over the warmup steps, then 1 -> 0 at `steps` (HF's linear schedule, which
    FlagEmbedding's trainers use)."""
    warmup = math.ceil(steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def build_optimizer(model: nn.Module, cfg: TrainingConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights (the 1-D parameters) get no weight decay, as in BERT.

    fused (default: every strategy but FSDP, whose parameters are DTensors): the same update in one
    kernel per parameter group instead of a chain of element-wise ops, each a pass over memory; on a
    250k-id vocabulary the embedding table dominates that traffic (tested equal to the plain AdamW)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if fused is None:
        fused = cfg.strategy != "fsdp"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=fused or None)


def wrap_model(
    model: nn.Module, strategy: str, device: torch.device, shard_units: Callable[[nn.Module], list[nn.Module]]
) -> nn.Module:
    """DDP (replicas, gradients all-reduced) or FSDP2 (`fully_shard` on each unit, then the root, which
    keeps what the units leave: embeddings, heads, the RetroMAE decoder)."""
    if not dist.is_initialized():
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in shard_units(model):
            fully_shard(unit)
        return fully_shard(model)
    if dist.get_world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def controller_poll_s() -> float:
    """How often Ray Train's controller collects the workers' reports (Ray's default: 2 s)."""
    return float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))


def _all_reduce_sum(means: list[torch.Tensor], counts: list[float], device: torch.device) -> list[float]:
    """Sum over workers of this worker's metric values and counts, with one all-reduce and one sync."""
    values = (
        torch.stack([m.to(torch.float64) for m in means]) if means else torch.zeros(0, device=device)
    )  # (M,)
    tensor = torch.cat(
        [values.to(device), torch.tensor(counts, dtype=torch.float64, device=device)]
    )  # (M+C,)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _gather_rows(rows: list[str]) -> list[str]:
    if not dist.is_initialized():
        return sorted(rows)
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    return sorted(r for part in gathered for r in part or [])


def read_metrics(out: storage.Location) -> list[dict]:
    """A training stage's metrics.jsonl (one record per optimizer step); [] when it has none yet."""
    loc = out.child("metrics.jsonl")
    if not storage.exists(loc):
        return []
    return [json.loads(line) for line in storage.read_bytes(loc).decode("utf-8").splitlines() if line.strip()]


def tail_mean(history: list[dict], key: str, n: int = 10) -> float | None:
    """The mean of `key` over the last n records that have it: a final loss less noisy than the last step's."""
    values = [r[key] for r in history[-n:] if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _upload_history(dest: storage.Location, history: list[dict]) -> None:
    storage.write_bytes(dest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in history).encode())


@dataclass
class Progress:
    """Where a run stands; restored from a checkpoint on resume."""

    step: int = 0  # optimizer steps done
    position: DataPosition = field(default_factory=DataPosition)  # next micro-batch of this worker
    session: int = 1  # 1 + the number of starts from a checkpoint before this one
    resumed_from: int | None = None  # the checkpoint step this session started from
    history: list[dict] = field(default_factory=list)  # one metrics record per step (rank 0)


def _resume(model: nn.Module, optimizer, scheduler, rank: int, world: int, config_hash: str) -> Progress:
    latest = ray.train.get_checkpoint()
    if latest is None:
        return Progress()
    with latest.as_directory() as directory:
        state, history = checkpoint.load(directory, model, optimizer, rank)
    scheduler.load_state_dict(state["scheduler"])
    if state["world_size"] != world:
        raise RuntimeError(
            f"the checkpoint at step {state['step']} was written by {state['world_size']} workers, this run "
            f"has {world}: the data position is per worker; resume with the same number of workers"
        )
    if state.get("config_hash") != config_hash:
        log.warning(
            "resuming from a checkpoint written by another config (hash %s)", state.get("config_hash")
        )
    progress = Progress(
        step=state["step"],
        position=DataPosition(**state["position"]),
        session=state["session"] + 1,
        resumed_from=state["step"],
        history=[r for r in history if r["step"] <= state["step"]],
    )
    log.info(
        "rank %d: resumed from step %d at %s (session %d)",
        rank,
        progress.step,
        progress.position,
        progress.session,
    )
    return progress


def _save(
    progress: Progress, model, optimizer, scheduler, report: dict, rank: int, world: int, config_hash: str
) -> None:
    """All ranks: write this rank's part of the checkpoint and hand it to Ray Train, which merges the
    ranks' folders into one checkpoint in the run's storage."""
    state = {
        "step": progress.step,
        "position": {"epoch": progress.position.epoch, "batch": progress.position.batch},
        "session": progress.session,
        "world_size": world,
        "scheduler": scheduler.state_dict(),
        "config_hash": config_hash,
    }
    with tempfile.TemporaryDirectory(prefix="chuxin-ckpt-") as directory:
        checkpoint.save(directory, model, optimizer, state, rank, progress.history if rank == 0 else None)
        ray.train.report(
            report,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint-step{progress.step:08d}-session{progress.session}",
        )


def train(cfg: TrainingConfig, task: TrainTask) -> dict:
    """Run inside a Ray Train worker until `cfg.steps` optimizer steps (or `stop_after_steps`).

    Returns (on every rank) {"step", "stopped", "session", "resumed_from"}; rank 0's becomes
    `Result.return_value`."""
    from ray.train.torch import get_device

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))  # fractional CPUs: 1 thread, not all cores
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg.seed + rank)  # dropout differs across ranks, as under torchrun
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    model = task.model
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    model.train()
    sparse_tables: SparseTables | None = None
    sparse_params = []
    if task.sparse_grad_params and cfg.strategy == "ddp":
        sparse_tables = sparse_lookup_grads(model, task.sparse_grad_params)
        if world > 1:
            sparse_params = leave_out_of_ddp(model, task.sparse_grad_params)
    model = wrap_model(model, cfg.strategy, device, task.shard_units)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(cfg.steps, cfg.warmup_ratio))
    progress = _resume(model, optimizer, scheduler, rank, world, task.config_hash)

    batches = prefetched(task.batches(progress.position), task.prefetch)
    stopped = False
    last_report = time.monotonic()
    try:
        while progress.step < cfg.steps:
            if cfg.stop_after_steps is not None and progress.step >= cfg.stop_after_steps:
                stopped = True
                break
            started = time.perf_counter()
            data_time = 0.0
            sums: dict[str, torch.Tensor] = {}
            samples = tokens = slots = 0
            rows: list[str] = []
            for micro in range(cfg.grad_accumulation):
                waited = time.perf_counter()
                batch = next(batches)
                data_time += time.perf_counter() - waited
                samples, tokens, slots = samples + batch.samples, tokens + batch.tokens, slots + batch.slots
                rows.extend(batch.rows or [])
                progress.position = batch.position.next()
                batch = batch.to(device)
                context = StepContext(
                    step=progress.step + 1,
                    loss_scale=1.0 / cfg.grad_accumulation,
                    no_sync=model.no_sync if isinstance(model, nn.parallel.DistributedDataParallel) else None,
                )
                with grad_sync(model, micro == cfg.grad_accumulation - 1):
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                        out = task.model_step(model, batch, context)
                    if not out.backward_done:
                        (out.loss * context.loss_scale).backward()
                for name, value in {"loss": out.loss, **out.metrics}.items():
                    value = value.detach().float()
                    sums[name] = sums[name] + value if name in sums else value
            if cfg.fail_at_step == progress.step + 1 and progress.resumed_from is None and rank == world - 1:
                log.warning(
                    "rank %d: fail_at_step=%d: killing this worker (test hook)", rank, cfg.fail_at_step
                )
                # A reported checkpoint counts once the controller has collected it, at its next poll: die
                # after that, so the checkpoint the run resumes from does not depend on timing.
                time.sleep(2 * controller_poll_s())
                os.kill(os.getpid(), signal.SIGKILL)
            if sparse_params:
                all_reduce_rows(sparse_params, sparse_tables)
            max_norm = cfg.max_grad_norm or math.inf
            if sparse_tables is not None:  # the same clipping, over the rows the step touched
                grad_norm = clip_grad_norm(list(model.parameters()), max_norm, sparse_tables)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            zero_grads(optimizer, sparse_tables)
            progress.step += 1

            names = sorted(sums)
            # Whether a metrics report is due is rank 0's clock, summed into the same all-reduce, so every
            # rank reports at the same step: a report is a barrier across the workers.
            due_here = float(rank == 0 and time.monotonic() - last_report >= cfg.report_every_s)
            *means, samples, tokens, slots, due = _all_reduce_sum(
                [sums[n] / cfg.grad_accumulation for n in names], [samples, tokens, slots, due_here], device
            )
            elapsed = time.perf_counter() - started
            record = {
                "step": progress.step,
                "epoch": progress.position.epoch,
                **{n: means[i] / world for i, n in enumerate(names)},  # means over micro-batches and workers
                "lr": lr,
                "grad_norm": float(grad_norm),  # before clipping
                "samples": int(samples),
                "tokens": int(tokens),
                "padding": 1.0 - tokens / max(slots, 1.0),
                "samples_per_s": samples / elapsed,
                "tokens_per_s": tokens / elapsed,
                "step_time_s": elapsed,
                "data_time_s": data_time,
                "session": progress.session,
                "resumed_from": progress.resumed_from,
            }
            if cfg.record_rows:
                record["rows"] = _gather_rows(rows)
            progress.history.append(record)
            report = {k: v for k, v in record.items() if k != "rows" and v is not None}

            if progress.step % cfg.checkpoint_every == 0 or progress.step == cfg.steps:
                _save(progress, model, optimizer, scheduler, report, rank, world, task.config_hash)
                last_report = time.monotonic()
                if rank == 0 and task.metrics_dest is not None:
                    _upload_history(task.metrics_dest, progress.history)
            elif due:
                ray.train.report(report)
                last_report = time.monotonic()
    finally:
        if isinstance(batches, Prefetched):
            batches.close()

    if not stopped:
        full_state = checkpoint.full_model_state(model)  # collective under FSDP
        if rank == 0 and task.export is not None:
            task.export(full_state)
    if rank == 0 and task.metrics_dest is not None:
        _upload_history(task.metrics_dest, progress.history)
    if dist.is_initialized():
        dist.barrier()  # every output is written before any worker returns
    return {
        "step": progress.step,
        "stopped": stopped,
        "session": progress.session,
        "resumed_from": progress.resumed_from,
    }
