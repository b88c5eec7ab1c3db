"""GradCache: a contrastive loss over a batch far larger than the activations that fit in memory.

Gao, Zhang, Han, Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup", arXiv:2101.06983. In-batch negatives make the loss depend on the whole batch, so plain gradient
accumulation changes the loss; GradCache keeps it:
  1. encode every chunk without grad, keeping only the representations (B*G x H floats, not
     activations), and the RNG state each chunk started from;
  2. compute the loss on the whole batch of representations and its gradient w.r.t. them;
  3. encode each chunk again with grad, under the RNG state of step 1 (same dropout masks), and
     backpropagate the cached representation gradient through it.
Peak activation memory is one chunk's; the cost is one extra forward of the encoder (~1/3 more FLOPs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

Batch = Mapping[
    str, Any
]  # tensors with a leading batch dimension, sliced into chunks; other values passed as is


def _leaves(reps: Any) -> list[torch.Tensor]:
    if isinstance(reps, torch.Tensor):
        return [reps]
    if isinstance(reps, Mapping):
        return [leaf for value in reps.values() for leaf in _leaves(value)]
    if isinstance(reps, tuple | list):
        return [leaf for value in reps for leaf in _leaves(value)]
    raise TypeError(
        f"encode must return tensors, or tuples, lists or dicts of them; got {type(reps).__name__}"
    )


def _rebuild(template: Any, leaves: Iterator[torch.Tensor]) -> Any:
    if isinstance(template, torch.Tensor):
        return next(leaves)
    if isinstance(template, Mapping):
        return type(template)((key, _rebuild(value, leaves)) for key, value in template.items())
    values = [_rebuild(value, leaves) for value in template]
    if isinstance(template, tuple) and hasattr(template, "_fields"):  # NamedTuple, e.g. M3Output
        return type(template)(*values)
    return type(template)(values)


def _chunks(batch: Batch, chunk_size: int) -> list[dict[str, Any]]:
    rows = {value.size(0) for value in batch.values() if isinstance(value, torch.Tensor)}
    if len(rows) != 1:
        raise ValueError(f"batch tensors must share one leading size, got {sorted(rows)}")
    total = rows.pop()
    return [
        {
            key: value[start : start + chunk_size] if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
        }
        for start in range(0, total, chunk_size)
    ]


class _RngState:
    """CPU and CUDA generator states at the start of one chunk's first forward."""

    def __init__(self, chunk: dict[str, Any]) -> None:
        self.cpu = torch.get_rng_state()
        devices = {
            value.device.index
            for value in chunk.values()
            if isinstance(value, torch.Tensor) and value.is_cuda
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            devices.add(torch.cuda.current_device())
        self.devices = sorted(devices)
        self.cuda = [torch.cuda.get_rng_state(device) for device in self.devices]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        # fork_rng puts the generators back afterwards: the replay draws the same numbers again
        # without moving the global RNG past where the first pass left it
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda, strict=True):
                torch.cuda.set_rng_state(state, device)
            yield


def grad_cache_backward(
    encode: Callable[[dict[str, Any]], Any],
    batches: Sequence[Batch],
    loss_fn: Callable[..., torch.Tensor],
    chunk_size: int | Sequence[int],
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Accumulate into the parameters' .grad the gradient of loss_fn(encode(batches[0]), ...) as if each
    batch were encoded in one piece, holding the activations of one chunk at a time; return the loss.

    Inputs:
      encode: runs the model on one chunk (a dict like the batch, sliced) and returns a tensor, or a
        tuple / NamedTuple / list / dict of tensors whose first dimension is the chunk's rows
        (e.g. `M3Embedder` returns an `M3Output`). Must be deterministic given the RNG state.
      batches: one per loss argument, e.g. [queries (B rows), passages (B*G rows)]; padded once for
        the whole batch so that chunk outputs concatenate.
      loss_fn: called as loss_fn(reps_0, reps_1, ...) on the whole batch's representations, returns ().
      chunk_size: rows per chunk, one for all batches or one per batch.
      no_sync: e.g. `ddp_model.no_sync`; every replay but the last runs under it, so DDP all-reduces the
        gradients once per call. Every rank must then see the same number of chunks (DDP forwards may
        broadcast buffers).

    The loss_fn's own gradient (cross-device gathers included) is computed once, in step 2. Loss
    scaling for fp16 is left to the caller (bf16 needs none). Returns the detached loss, ().
    """
    sizes = [chunk_size] * len(batches) if isinstance(chunk_size, int) else list(chunk_size)
    if len(sizes) != len(batches):
        raise ValueError(f"{len(sizes)} chunk sizes for {len(batches)} batches")

    plans: list[list[tuple[dict[str, Any], _RngState]]] = []
    cached: list[Any] = []
    for batch, size in zip(batches, sizes, strict=True):
        plan, outputs = [], []
        for chunk in _chunks(batch, size):
            state = _RngState(chunk)
            with torch.no_grad():
                outputs.append(encode(chunk))
            plan.append((chunk, state))
        plans.append(plan)
        merged = [torch.cat(parts, dim=0) for parts in zip(*(_leaves(out) for out in outputs), strict=True)]
        # detached copies that collect d loss / d representation; integer outputs (ids, masks) get none
        merged = [leaf.detach().requires_grad_(leaf.is_floating_point()) for leaf in merged]
        cached.append(_rebuild(outputs[0], iter(merged)))

    loss = loss_fn(*cached)  # ()
    loss.backward()

    last = (len(plans) - 1, len(plans[-1]) - 1)
    for index, (plan, reps) in enumerate(zip(plans, cached, strict=True)):
        grads = [leaf.grad for leaf in _leaves(reps)]
        start = 0
        for position, (chunk, state) in enumerate(plan):
            sync = no_sync is None or (index, position) == last
            with contextlib.nullcontext() if sync else no_sync(), state.replay():
                leaves = _leaves(encode(chunk))
                rows = leaves[0].size(0)
                pairs = [
                    (leaf, grad[start : start + rows])
                    for leaf, grad in zip(leaves, grads, strict=True)
                    if grad is not None and leaf.requires_grad
                ]
                if pairs:
                    torch.autograd.backward([leaf for leaf, _ in pairs], [grad for _, grad in pairs])
            start += rows
    return loss.detach()
