"""Token-embedding gradients as what they are, a few rows of a large table: accumulated and all-reduced
by row.

`sparse_lookup_grads`: by default every backward through an embedding lookup allocates a zero-filled
dense (V, H) gradient, scatters its rows into it, and autograd adds that to .grad: for XLM-R's 250,002
rows up to two passes over the whole table per lookup, and a contrastive step does two lookups
(queries, passages).
Instead the lookups produce sparse gradients, added row by row into a dense .grad buffer that stays
allocated and is zeroed in place between steps (`zero_grads`). The optimizer sees the same dense
gradient (tests/unit/test_train_loop.py checks the trained weights against the plain path).

Gradient all-reduce of an embedding table over the rows some rank touched, not the whole table.

A contrastive step touches a few thousand of XLM-R's 250,002 token rows, yet DDP all-reduces the whole
(V, H) gradient every step: 32 MB for a hidden size of 32, 1 GB for bge-m3's 1024. Here such tables
are left out of DDP's buckets, and after the last backward of a step `all_reduce_rows`:

    each rank: the rows of its gradient that are not all zero        (r_i,)
    all ranks: the union of those rows (two all_gathers)             (R,)
    all ranks: those rows of the gradient, all-reduced and averaged  (R, H)

Rows no rank touched are zero everywhere, so the gradient equals DDP's dense all-reduce (mean over
ranks), which tests/unit/test_sparse_rows.py checks. Only for tables whose gradient is sparse: a table
tied to an LM head (RetroMAE pretraining) has a dense gradient, and this would only add the gathers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def leave_out_of_ddp(model: nn.Module, names: tuple[str, ...]) -> list[nn.Parameter]:
    """Before wrapping `model` in DDP: the named parameters are neither bucketed nor broadcast by DDP;
    rank 0's values are broadcast here instead, as DDP does for the rest. Returns them."""
    params = dict(model.named_parameters())
    missing = [name for name in names if name not in params]
    if missing:
        raise ValueError(f"no parameters named {missing} in {type(model).__name__}")
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(names))
    for name in names:
        dist.broadcast(params[name].data, src=0)
    return [params[name] for name in names]


def all_reduce_rows(params: list[nn.Parameter]) -> int:
    """Average the gradients of `params` ((V, H) each) over ranks, sending only the rows some rank
    touched. Returns how many rows were sent (over all params)."""
    world = dist.get_world_size()
    sent = 0
    for param in params:
        if param.grad is None:  # this rank touched nothing; others may have
            param.grad = torch.zeros_like(param)
        grad = param.grad  # (V, H)
        local = grad.ne(0).any(dim=1).nonzero().squeeze(1)  # (r,)
        counts = [torch.zeros(1, dtype=torch.int64, device=grad.device) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([len(local)], dtype=torch.int64, device=grad.device))
        longest = int(max(c.item() for c in counts))
        padded = torch.full((longest,), -1, dtype=torch.int64, device=grad.device)  # (r_max,)
        padded[: len(local)] = local
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        rows = torch.unique(torch.cat(gathered))  # (R,) sorted, -1 first if present
        rows = rows[rows >= 0]
        values = grad.index_select(0, rows)  # (R, H)
        dist.all_reduce(values)
        grad.index_copy_(0, rows, values.div_(world))
        sent += len(rows)
    return sent


def sparse_lookup_grads(model: nn.Module, names: tuple[str, ...]) -> list[nn.Parameter]:
    """Make the nn.Embedding modules that own the named tables return sparse gradients and give each
    table a zeroed dense .grad for them to add into. Returns the tables (see `zero_grads`)."""
    params = dict(model.named_parameters())
    tables = [params[name] for name in names]
    owners = [
        m for m in model.modules() if isinstance(m, nn.Embedding) and any(m.weight is t for t in tables)
    ]
    if len(owners) != len(tables):
        raise ValueError(f"{names}: not each the weight of one nn.Embedding in {type(model).__name__}")
    for module in owners:
        module.sparse = True
        module.weight.grad = torch.zeros_like(module.weight)
    return tables


def zero_grads(optimizer: torch.optim.Optimizer, kept: list[nn.Parameter]) -> None:
    """optimizer.zero_grad(set_to_none=True), except that the `kept` parameters' dense buffers are
    zeroed in place: a sparse gradient added to None would stay sparse, which AdamW refuses."""
    buffers = [(param, param.grad) for param in kept]
    optimizer.zero_grad(set_to_none=True)
    for param, grad in buffers:
        param.grad = grad.zero_()
