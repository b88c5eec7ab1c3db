"""All-gather across torch.distributed ranks that keeps the autograd graph.

`torch.distributed.all_gather` returns tensors with no grad_fn, so a loss over gathered passages would
send no gradient back to the ranks that encoded them. Here the backward all-reduces (sums) the gradient
of the gathered tensor over ranks and hands each rank the rows it contributed: rank r receives
d(sum_k L_k)/d(x_r), where L_k is rank k's loss. Averaged over ranks as DDP does, the parameter
gradient is then exactly that of one process holding the whole global batch (tested in
tests/unit/test_losses_contrastive.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        tensor = tensor.contiguous()
        world = dist.get_world_size(group)
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor, group=group)
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = tensor.size(0)
        return torch.cat(parts, dim=0)  # (world * N, ...)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        # all_reduce, not reduce_scatter: gloo has no reduce_scatter, and the payload is embeddings
        # (B*G*H floats: 16*8*1024*4 B = 512 KiB at BGE-M3 scale), so the world-times larger transfer is noise.
        grad = grad_output.contiguous().clone()  # (world * N, ...); autograd may reuse grad_output
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None  # (N, ...)


def world_and_rank(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(world size, rank) of `group`, or (1, 0) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def all_gather_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate `tensor` (N, ...) from every rank along dim 0, rank order, keeping gradients.

    Every rank must pass the same shape (the batch plan gives each rank the same batch size).
    Without an initialised process group, or with one rank, returns `tensor` itself.
    """
    world, _ = world_and_rank(group)
    if world == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)  # (world * N, ...)
