"""One home for the ``torch.distributed`` helpers the losses and training modules share.

Every helper is the identity (or 1 / 0) when ``torch.distributed`` is not initialised, so the same code runs
in a notebook, in one process and under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_no_grad", "all_gather_with_grad", "all_reduce_sum", "get_rank", "get_world_size"]


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the incoming gradients over ranks and keeps the local slice.

    The sum is needed because rank ``r``'s loss also depends on rank ``q``'s embeddings (as candidates);
    without it each rank would only see the gradient of its own loss and miss the cross terms.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rank = dist.get_rank()  # type: ignore[attr-defined]
        ctx.batch = x.shape[0]  # type: ignore[attr-defined]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.batch  # type: ignore[attr-defined]
        return grad[start : start + ctx.batch]  # type: ignore[attr-defined]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks in rank order -> (W*B, ...), differentiably.

    Gradients flow back to the local part: rank ``q`` receives the sum over ranks of the gradients with
    respect to its slice, which with DDP's gradient averaging gives the exact gradient of the mean of
    the per-rank losses. Identity (the same tensor) when ``torch.distributed`` is not initialised.
    Every rank must pass the same shape.
    """
    if get_world_size() == 1:
        return x
    out: torch.Tensor = _AllGatherWithGrad.apply(x)
    return out


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks (no autograd): labels, or detached embeddings for a memory bank."""
    if get_world_size() == 1:
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward also sums: every rank's output depends on every rank's input."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``x`` over all processes (identity without ``torch.distributed``).

    Every rank then computes the same global loss; the backward sum makes each rank's gradient
    ``world_size`` times its share of the full-batch gradient, which DDP's gradient *averaging* turns
    into exactly the full-batch gradient.
    """
    if get_world_size() == 1:
        return x
    out: torch.Tensor = _AllReduceSum.apply(x)
    return out
