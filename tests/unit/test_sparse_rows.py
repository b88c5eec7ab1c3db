"""Sparse lookup gradients and the row-sparse all-reduce of an embedding (train/sparse_rows.py), together
as the training loop runs them, against DDP's dense all-reduce, on 2 gloo ranks in spawned processes (rank 0 saves what both saw to a file)."""

from __future__ import annotations

import copy
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from chuxin_ray.train.sparse_rows import (
    all_reduce_rows,
    clip_grad_norm,
    leave_out_of_ddp,
    sparse_lookup_grads,
    zero_grads,
)

WORLD = 2
VOCAB, DIM = 500, 6


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> ()
        return self.head(self.embed(ids).mean(dim=1)).square().mean()


def _batches(rank: int) -> list[torch.Tensor]:
    """Two micro-batches per rank; the ranks share some rows (0-49) and touch others alone."""
    g = torch.Generator().manual_seed(rank)
    own = torch.randint(50 + 200 * rank, 250 + 200 * rank, (2, 4, 7), generator=g)
    shared = torch.randint(0, 50, (2, 4, 3), generator=g)
    return list(torch.cat([own, shared], dim=2))


def _grads(model: nn.Module, sparse: bool, rank: int) -> tuple[dict, int]:
    torch.manual_seed(100 + rank)  # the ranks start apart: DDP's (or our) broadcast must align them
    inner = Bag()
    params, tables = [], None
    if sparse:  # as the training loop does: sparse lookup gradients, then the rows all-reduced
        tables = sparse_lookup_grads(inner, ("embed.weight",))
        params = leave_out_of_ddp(inner, ("embed.weight",))
    ddp = nn.parallel.DistributedDataParallel(inner)
    first, last = _batches(rank)
    with ddp.no_sync():  # gradient accumulation: the first micro-batch is not synchronised
        ddp(first).backward()
    ddp(last).backward()
    sent = all_reduce_rows(params, tables) if sparse else 0
    return {name: p.grad.clone() for name, p in inner.named_parameters()}, sent


def _rank_main(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        dense, _ = _grads(Bag(), sparse=False, rank=rank)
        sparse, sent = _grads(Bag(), sparse=True, rank=rank)
        both = [None] * WORLD
        dist.all_gather_object(both, {"dense": dense, "sparse": sparse, "sent": sent})
        if rank == 0:
            torch.save(both, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sparse_rows") / "results.pt"
    mp.spawn(_rank_main, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out)


def test_sparse_rows_equal_the_dense_all_reduce(ranks):
    for result in ranks:
        for name, dense in result["dense"].items():
            torch.testing.assert_close(result["sparse"][name], dense, msg=name)
    torch.testing.assert_close(ranks[0]["sparse"]["embed.weight"], ranks[1]["sparse"]["embed.weight"])


def test_only_touched_rows_are_sent(ranks):
    touched = set()
    for rank in range(WORLD):
        touched |= set(torch.cat([b.flatten() for b in _batches(rank)]).tolist())
    assert ranks[0]["sent"] == ranks[1]["sent"] == len(touched) < VOCAB
    untouched = torch.ones(VOCAB, dtype=torch.bool)
    untouched[sorted(touched)] = False
    assert ranks[0]["sparse"]["embed.weight"][untouched].abs().sum() == 0


def test_unknown_names_fail_before_any_collective():
    with pytest.raises(ValueError, match="no parameters named"):
        leave_out_of_ddp(Bag(), ("embeddings.word_embeddings.weight",))


def test_clipping_and_zeroing_by_touched_rows_equal_the_plain_path():
    """One process: two micro-batches of sparse lookups; the norm, the clipped gradients and the
    zeroed buffers equal torch's clip_grad_norm_ and zero_grad on a copy with dense gradients."""
    torch.manual_seed(0)
    plain = Bag()
    model = copy.deepcopy(plain)
    tables = sparse_lookup_grads(model, ("embed.weight",))
    batches = _batches(0) + _batches(1)
    for ids in batches:
        plain(ids).backward()
        model(ids).backward()
    touched = tables.touched(model.embed.weight)
    nonzero = model.embed.weight.grad.ne(0).any(dim=1).nonzero().squeeze(1)
    assert set(nonzero.tolist()) <= set(touched.tolist()) == set(torch.cat(batches).flatten().tolist())

    for max_norm in (math.inf, 1e-3):  # not clipping, then clipping (the norm is well above 1e-3)
        want = torch.nn.utils.clip_grad_norm_(list(plain.parameters()), max_norm)
        got = clip_grad_norm(list(model.parameters()), max_norm, tables)
        torch.testing.assert_close(got, want)
        for (name, a), b in zip(model.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert want > 1e-2

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    buffer = model.embed.weight.grad
    zero_grads(optimizer, tables)
    assert model.embed.weight.grad is buffer and not buffer.any()  # kept, zeroed
    assert model.head.weight.grad is None
    assert len(tables.touched(model.embed.weight)) == 0  # the next step starts with no rows
