"""Gathering across ranks for the objectives that couple ranks (ITC queue, ITM negatives).

Every function is the identity when torch.distributed is not initialised, so a single process
needs no process group. All ranks must pass tensors of the same shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, rank order; no gradient."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.batch = tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss reaches every gathered slice
        start = rank() * ctx.batch
        return grad[start : start + ctx.batch]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0; gradients flow back to each owner."""
    if world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def token_share(count: torch.Tensor) -> torch.Tensor:
    """This rank's share of the global count of loss tokens: the all-reduced `count` over the world size.

    A token loss summed on each rank and divided by this share averages, over ranks (what
    data-parallel gradient averaging does), to the mean over every token of the global batch:
    the same loss and gradient as one rank holding the whole batch. Every rank must call it.
    """
    total = count.detach().float().reshape(1)
    if world_size() > 1:
        dist.all_reduce(total)
    return total[0] / world_size()
