"""One home for the ``torch.distributed`` helpers the losses and training modules share.

Every helper is the identity (or 1 / 0) when ``torch.distributed`` is not initialised, so the same code runs
in a notebook, in one process and under DDP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "NoBroadcastState",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "all_reduce_sum",
    "get_rank",
    "get_world_size",
]


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


class NoBroadcastState(nn.Module):
    """Base for modules whose tensor state DDP must not overwrite: attributes named in ``no_broadcast``.

    ``DistributedDataParallel`` (``broadcast_buffers=True``, Lightning's default) copies *every* buffer of rank 0
    over the other ranks before each forward, persistent or not, and it re-reads ``named_buffers()`` before
    each broadcast (pytorch/pytorch#63916), so re-assigning a buffer (what the official Momentum2-Teacher code did
    on torch 1.5, whose DDP kept the first list) no longer escapes it. State that is rank-local by definition (Momentum2-Teacher's per-GPU BN statistics) or identical by
    construction and large (a cross-batch memory) is therefore kept as plain tensor attributes, which this class
    makes behave like buffers otherwise: they follow ``.to(device / dtype)`` / ``.cuda()`` / ``.double()``
    (through ``_apply``, floating tensors only change dtype) and are saved and restored by ``state_dict`` /
    ``load_state_dict`` under their own names (so checkpoints keep the usual keys and resume). An attribute may be
    ``None`` (not allocated yet): it is then left out of the state dict, and loading assigns a copy of the saved
    tensor; an allocated one is copied into in place and must keep its shape.
    """

    no_broadcast: tuple[str, ...] = ()

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        super()._apply(fn, recurse)
        for name in self.no_broadcast:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.no_broadcast:
            value = getattr(self, name)
            if value is not None:
                destination[prefix + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        keys = {prefix + name: name for name in self.no_broadcast}
        rest = {k: v for k, v in state_dict.items() if k not in keys}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for key, name in keys.items():
            current = getattr(self, name)
            if key not in state_dict:
                if current is not None and strict:
                    missing_keys.append(key)
                continue
            value = state_dict[key]
            if not isinstance(value, torch.Tensor):
                error_msgs.append(f"{key}: expected a tensor, got {type(value).__name__}")
            elif current is None:
                setattr(self, name, value.detach().clone())
            elif current.shape != value.shape:
                error_msgs.append(
                    f"size mismatch for {key}: checkpoint {tuple(value.shape)}, module {tuple(current.shape)}"
                )
            else:
                with torch.no_grad():
                    current.copy_(value)
