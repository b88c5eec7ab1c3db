"""Token-embedding gradients as what they are, a few rows of a large table: accumulated and all-reduced
by row.

`sparse_lookup_grads`: by default every backward through an embedding lookup allocates a zero-filled
dense (V, H) gradient, scatters its rows into it, and autograd adds that to .grad: for XLM-R's 250,002
rows up to two passes over the whole table per lookup, and a contrastive step does two lookups
(queries, passages).
Instead the lookups produce sparse gradients, added row by row into a dense .grad buffer that stays
allocated. The optimizer sees the same dense gradient (tests/unit/test_train_loop.py checks the
trained weights against the plain path). The returned `SparseTables` records, from those sparse
gradients, which rows a step touched, so the step zeroes (`zero_grads`), clips (`clip_grad_norm`) and
all-reduces (`all_reduce_rows`) those rows only, not the whole table: on one core, finding the
non-zero rows of a (250,002, 32) gradient took 31 ms, zeroing it 5 ms, clipping 11 ms.

Gradient all-reduce of an embedding table over the rows some rank touched, not the whole table.

A contrastive step touches a few thousand of XLM-R's 250,002 token rows, yet DDP all-reduces the whole
(V, H) gradient every step: 32 MB for a hidden size of 32, 1 GB for bge-m3's 1024. Here such tables
are left out of DDP's buckets, and after the last backward of a step `all_reduce_rows`:

    each rank: the rows its lookups touched (or its non-zero rows)   (r_i,)
    all ranks: the union of those rows (two all_gathers)             (R,)
    all ranks: those rows of the gradient, all-reduced and averaged  (R, H)

Rows no rank touched are zero everywhere, so the gradient equals DDP's dense all-reduce (mean over
ranks), which tests/unit/test_sparse_rows.py checks. Only for tables whose gradient is sparse: a table
tied to an LM head (RetroMAE pretraining) has a dense gradient, and this would only add the gathers.
"""

from __future__ import annotations

import functools
import math

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


def all_reduce_rows(params: list[nn.Parameter], tables: SparseTables | None = None) -> int:
    """Average the gradients of `params` ((V, H) each) over ranks, sending only the rows some rank
    touched (as `tables` recorded them, else its non-zero rows). Returns how many rows were sent (over
    all params)."""
    world = dist.get_world_size()
    sent = 0
    for param in params:
        if param.grad is None:  # this rank touched nothing; others may have
            param.grad = torch.zeros_like(param)
        grad = param.grad  # (V, H)
        local = tables.touched(param) if tables is not None else None
        if local is None:
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
        if tables is not None:
            tables.add_rows(param, rows)  # rows other ranks touched are set here now
        sent += len(rows)
    return sent


class SparseTables:
    """Embedding tables whose lookups give sparse gradients (see `sparse_lookup_grads`), and the rows
    of each that the step's backward passes touched, read off those gradients by a hook."""

    def __init__(self, tables: list[nn.Parameter]):
        self.tables = tables
        self._rows: dict[int, list[torch.Tensor]] = {id(t): [] for t in tables}
        self._dense: set[int] = set()  # tables that got a dense gradient this step: any row may be set
        for table in tables:
            table.register_hook(functools.partial(self._seen, id(table)))

    def _seen(self, key: int, grad: torch.Tensor) -> None:
        if grad.is_sparse:
            self._rows[key].append(grad._indices().reshape(-1))
        else:
            self._dense.add(key)

    def add_rows(self, table: nn.Parameter, rows: torch.Tensor) -> None:
        self._rows[id(table)].append(rows)

    def touched(self, table: nn.Parameter) -> torch.Tensor | None:
        """(r,) sorted rows of `table`'s gradient that may be non-zero; None: any row may be."""
        key = id(table)
        if key in self._dense:
            return None
        found = self._rows[key]
        if not found:
            return torch.zeros(0, dtype=torch.int64, device=table.device)
        rows = torch.unique(torch.cat(found))  # (r,)
        self._rows[key] = [rows]
        return rows

    def forget(self) -> None:
        for key in self._rows:
            self._rows[key] = []
        self._dense.clear()


def sparse_lookup_grads(model: nn.Module, names: tuple[str, ...]) -> SparseTables:
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
    return SparseTables(tables)


def zero_grads(optimizer: torch.optim.Optimizer, tables: SparseTables | None) -> None:
    """optimizer.zero_grad(set_to_none=True), except that the tables' dense buffers are zeroed in place,
    only the rows the step touched: a sparse gradient added to None would stay sparse, which AdamW
    refuses."""
    kept = tables.tables if tables is not None else []
    buffers = [(param, param.grad) for param in kept]
    optimizer.zero_grad(set_to_none=True)
    for param, grad in buffers:
        rows = tables.touched(param)
        param.grad = grad.zero_() if rows is None else grad.index_fill_(0, rows, 0.0)
    if tables is not None:
        tables.forget()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, tables: SparseTables | None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (the total 2-norm before clipping; gradients scaled by
    max_norm / (norm + 1e-6) when that is below 1), reading and scaling only the touched rows of the
    tables' gradients: the other rows are zero."""
    sparse = {id(t): tables.touched(t) for t in tables.tables} if tables is not None else {}
    grads, parts = [], []  # (gradient or its touched rows, the rows or None)
    for param in params:
        if param.grad is None:
            continue
        rows = sparse.get(id(param))
        parts.append((param.grad, rows))
        grads.append(param.grad if rows is None else param.grad.index_select(0, rows))
    if not grads:
        return torch.tensor(0.0)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if math.isinf(max_norm):
        return norm
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for (grad, rows), selected in zip(parts, grads, strict=True):
        if rows is None:
            grad.mul_(scale)
        else:
            grad.index_copy_(0, rows, selected.mul_(scale))
    return norm
