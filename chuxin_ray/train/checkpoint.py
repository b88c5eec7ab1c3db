"""Training checkpoints: model and optimizer through torch.distributed.checkpoint, the rest as small files.

A checkpoint directory as Ray Train stores it (every worker's files merged into one directory):

    .metadata, __<rank>_0.distcp   model + optimizer state (DCP: each rank writes its shard under FSDP,
                                   one copy of each replicated tensor under DDP)
    state.json                     step, data position, session, world size, scheduler state, config hash
    rng-rank<r>.pt                 Python, NumPy, torch CPU and CUDA generator states of rank r
    metrics.jsonl                  the metrics history up to this step (rank 0)

DCP writes the same files for DDP and FSDP, so one code path saves and loads both and a run can resume
with the other strategy.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from chuxin_ray import storage
from chuxin_ray.config import StorageConfig

STATE = "state.json"
METRICS = "metrics.jsonl"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rank: int,
    history: list[dict] | None,
) -> None:
    """Every rank calls this (DCP is collective); rank 0 also writes state.json and the history."""
    directory = Path(directory)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))
    torch.save(rng_state(), directory / f"rng-rank{rank}.pt")
    if rank == 0:
        (directory / STATE).write_text(json.dumps(state, indent=2))
        write_history(directory / METRICS, history or [])


def load(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int
) -> tuple[dict[str, Any], list[dict]]:
    """Load model and optimizer in place (collective); returns (state, metrics history). This rank's RNG
    state is restored when the checkpoint has one (not after a change of worker count)."""
    directory = Path(directory)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    rng_file = directory / f"rng-rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))  # our own file: NumPy state is a tuple
    state = json.loads((directory / STATE).read_text())
    return state, read_history(directory / METRICS)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole unsharded state dict on CPU, on rank 0 (empty elsewhere); collective under FSDP."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def write_history(path: Path, history: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in history), encoding="utf-8")


def read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def upload_dir(local: str | Path, dest: storage.Location) -> list[str]:
    """Copy a local folder to `dest` (replacing what is there); returns the relative file names."""
    storage.delete_dir(dest)
    if dest.is_local:
        dest.fs.create_dir(dest.path, recursive=True)
    pafs.copy_files(
        str(local), dest.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs
    )
    return sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())


def absolute(source: str) -> str:
    """A relative local path made absolute, so that Ray Train workers (which run in their own working
    directory) find it; URIs and hub ids unchanged."""
    if "://" in source or not os.path.exists(source):
        return source
    return os.path.abspath(source)


def local_copy(uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """A local folder holding `uri`: object-store folders are downloaded to a temporary folder; local
    paths and hub ids are returned unchanged (transformers resolves them)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    src = storage.resolve(uri, storage_cfg)
    if not storage.exists(src):
        raise FileNotFoundError(f"nothing found at {src.uri}")
    target = tempfile.mkdtemp(prefix="chuxin-model-")
    try:
        pafs.copy_files(
            src.path, target, source_filesystem=src.fs, destination_filesystem=pafs.LocalFileSystem()
        )
    except Exception:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return os.path.join(target)
