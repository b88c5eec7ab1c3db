"""FSDP against DDP on 2 CPU processes (gloo): the sharded path must train the RetroMAE model as the
replicated one does, with gradient accumulation and clipping, and its checkpoint must load into DDP.

The processes run the loop's own pieces (wrap_model, grad_sync, build_optimizer, checkpoint.save/load)
without Ray: Ray Train adds only the process group and the data, which the integration tests cover.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from chuxin_ray.config import TrainingConfig
from chuxin_ray.models.masking import mask_retromae_batch
from chuxin_ray.models.retromae import RetroMAE
from chuxin_ray.models.tiny import build_tiny_masked_lm, tiny_xlmr_config
from chuxin_ray.stages.pretrain import encoder_layers
from chuxin_ray.train import checkpoint, loop

# Spawns 2 processes with a gloo group (~15-30 s on 2 cores): too slow for the unit tier.
pytestmark = pytest.mark.integration

VOCAB, MASK, SPECIALS = 50, 49, (0, 1, 2, 3)
STEPS, ACCUMULATION = 3, 2


def micro_batch(rank: int, step: int, micro: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)
    ids = torch.randint(4, MASK, (3, 12), generator=g)  # (B, L)
    ids[:, 0], ids[:, -1] = 0, 2
    return mask_retromae_batch(
        ids,
        torch.ones_like(ids),
        special_token_ids=SPECIALS,
        mask_token_id=MASK,
        vocab_size=VOCAB,
        generator=g,
    ).as_kwargs()


def fresh_model() -> RetroMAE:
    lm = build_tiny_masked_lm(tiny_xlmr_config(VOCAB, dropout=0.0), seed=0)
    return RetroMAE(lm, lm_head_chunk_size=8, decoder_seed=0)  # chunked: LinearCrossEntropy under FSDP


def train(strategy: str, rank: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    cfg = TrainingConfig(steps=STEPS, lr=1e-2, max_grad_norm=0.5, workers=2, strategy=strategy)
    model = loop.wrap_model(fresh_model(), strategy, torch.device("cpu"), encoder_layers)
    optimizer = loop.build_optimizer(model, cfg)
    for step in range(STEPS):
        for micro in range(ACCUMULATION):
            with loop.grad_sync(model, micro == ACCUMULATION - 1):
                (model(**micro_batch(rank, step, micro)).loss / ACCUMULATION).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out_dir = Path(out)
    ddp, _ = train("ddp", rank)
    fsdp, fsdp_optimizer = train("fsdp", rank)
    ddp_state, fsdp_state = checkpoint.full_model_state(ddp), checkpoint.full_model_state(fsdp)

    # An FSDP checkpoint (each rank writes its shard; Ray Train merges the folders) loads into DDP.
    checkpoint.save(out_dir / f"rank{rank}", fsdp, fsdp_optimizer, {"step": STEPS}, rank, history=[])
    dist.barrier()
    if rank == 0:
        merged = out_dir / "merged"
        for part in (out_dir / "rank0", out_dir / "rank1"):
            shutil.copytree(part, merged, dirs_exist_ok=True)
    dist.barrier()
    reloaded = loop.wrap_model(fresh_model(), "ddp", torch.device("cpu"), encoder_layers)
    optimizer = loop.build_optimizer(reloaded, TrainingConfig(steps=STEPS))
    checkpoint.load(out_dir / "merged", reloaded, optimizer, rank)
    reloaded_state = checkpoint.full_model_state(reloaded)
    if rank == 0:
        torch.save({"ddp": ddp_state, "fsdp": fsdp_state, "reloaded": reloaded_state}, out_dir / "states.pt")
    dist.destroy_process_group()


def test_fsdp_trains_like_ddp_and_its_checkpoint_loads_into_ddp(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(tmp_path)), nprocs=2)
    states = torch.load(tmp_path / "states.pt")
    ddp, fsdp, reloaded = states["ddp"], states["fsdp"], states["reloaded"]
    initial = fresh_model().state_dict()
    assert ddp.keys() == fsdp.keys() == reloaded.keys()
    moved = 0
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5, msg=key)
        torch.testing.assert_close(reloaded[key], fsdp[key], rtol=0, atol=0, msg=key)
        moved += not torch.equal(ddp[key], initial[key])
    assert moved > len(ddp) // 2  # training changed most tensors
