"""Momentum (EMA) teachers with momentum batch-norm statistics, as in Momentum^2 Teacher.

Li, Liu, Sun, "Momentum^2 Teacher: Momentum Teacher with Momentum Statistics for Self-Supervised
Learning" (arXiv 2101.07525, 2021). A BYOL-style teacher is an exponential moving average of the student;
Momentum^2 Teacher also replaces the teacher's batch statistics by *momentum statistics*: each teacher BN
normalises with ``alpha * batch + (1 - alpha) * running`` and then moves ``running`` towards the batch
statistics (averaged over both views) with the same ``alpha``. ``alpha`` decays from 1 (pure batch
statistics) to 0 with a cosine.

Under data parallelism the statistics are **per GPU**, as the method defines them: the paper's point is a
small-batch teacher "without ... inefficient across GPU operation (e.g., shuffling BN, synced BN)"
(abstract), and the official code (zengarden/momentum2-teacher, torch 1.5: ``momentum_teacher/models/
m2_teacher.py`` builds the teacher with ``bn="mbn"``, i.e. ``MomentumBatchNorm2d/1d`` of ``models/resnet_mbn.py``,
as copied in WangWenhao0716/ISC-Track1-Submission ``Pretrain/momentum2-teacher-resnetIBN/momentum_teacher/
models/resnet_mbn.py``) takes the batch mean / variance of the local batch (``torch.mean(x,
dim=[0, 2, 3])``, no all-reduce) and keeps one running chain per process: it *re-assigns*
``self.running_mean`` each update, and the torch 1.5 DDP it ran on (``tools/train.py``: ``DDP(model,
device_ids=[gpu])``, buffers broadcast) only broadcast the buffer tensors it had listed at construction, so
each rank's teacher kept its own statistics. Today's DDP re-lists buffers before every broadcast and would
overwrite every rank's statistics with rank 0's; :class:`MomentumBatchNorm` therefore keeps them out of the
buffers (:class:`isc.train.dist.NoBroadcastState`). A checkpoint stores rank 0's, as the official one did.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from isc.train.dist import NoBroadcastState

__all__ = [
    "MomentumBatchNorm",
    "commit_statistics",
    "convert_to_momentum_batchnorm",
    "cosine_momentum",
    "ema_update_",
    "make_teacher",
    "set_statistics_momentum",
    "statistics_momentum",
]


def cosine_momentum(step: int, total_steps: int, base: float = 0.99, final: float = 1.0) -> float:
    """Teacher EMA momentum at ``step`` of ``total_steps``: ``final - (final - base) (cos(pi k / K) + 1) / 2``.

    With ``final = 1`` this is BYOL's ``1 - (1 - base)(cos(pi k/K) + 1)/2``: ``base`` at the start, 1 at the end.
    """
    if total_steps <= 0:
        return base
    k = min(max(step, 0), total_steps)
    return final - (final - base) * (math.cos(math.pi * k / total_steps) + 1) / 2


def statistics_momentum(step: int, total_steps: int) -> float:
    """Momentum-BN weight of the current batch: ``(cos(pi k / K) + 1) / 2``, from 1 down to 0 (official M2T)."""
    if total_steps <= 0:
        return 1.0
    k = min(max(step, 0), total_steps)
    return (math.cos(math.pi * k / total_steps) + 1) / 2


class MomentumBatchNorm(NoBroadcastState):
    """Batch norm that normalises with momentum statistics; for (B, C), (B, C, L) or (B, C, H, W) inputs.

    Training: ``mu = alpha mu_batch + (1 - alpha) running_mean`` (same for the unbiased variance), the
    input is normalised with them and the batch statistics are kept until :meth:`commit`, which sets
    ``running = alpha * mean(kept batch stats) + (1 - alpha) * running`` (one update per iteration over
    both views, as in the official code). Evaluation: plain running statistics. Deliberately not a
    ``_BatchNorm`` subclass, so Lightning's SyncBatchNorm conversion leaves it alone.

    Batch statistics come from this process's batch and ``running_mean`` / ``running_var`` (C,) are this
    process's own (per GPU, as the official code: see the module docstring). They are plain tensors, not
    buffers, so DDP's per-forward buffer broadcast cannot replace them by rank 0's; they still follow
    ``.to()`` and are saved / loaded under ``running_mean`` / ``running_var`` like BatchNorm's.
    """

    no_broadcast = ("running_mean", "running_var")

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.alpha = 1.0
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.running_mean = torch.zeros(num_features)  # per-process state, not buffers (class docstring)
        self.running_var = torch.ones(num_features)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm) -> MomentumBatchNorm:
        """Same affine parameters and running statistics as ``bn`` (a BatchNorm*d or SyncBatchNorm)."""
        mbn = cls(bn.num_features, bn.eps, bn.affine)
        with torch.no_grad():
            if bn.affine:
                assert mbn.weight is not None and mbn.bias is not None
                mbn.weight.copy_(bn.weight)
                mbn.bias.copy_(bn.bias)
            if bn.running_mean is not None and bn.running_var is not None:
                mbn.running_mean.copy_(bn.running_mean)
                mbn.running_var.copy_(bn.running_var)
        return mbn.to(bn.weight.device if bn.affine else bn.running_mean.device)  # type: ignore[union-attr]

    def _dims(self, x: torch.Tensor) -> list[int]:
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected (B, {self.num_features}, ...) input, got {tuple(x.shape)}")
        return [0, *range(2, x.ndim)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = self._dims(x)
        if self.training:
            with torch.no_grad():
                batch_var, batch_mean = torch.var_mean(x, dim=dims, correction=1)
                self._pending.append((batch_mean, batch_var))
                mean = self.alpha * batch_mean + (1 - self.alpha) * self.running_mean
                var = self.alpha * batch_var + (1 - self.alpha) * self.running_var
        else:
            mean, var = self.running_mean, self.running_var
        # normalising with given statistics is batch norm's inference kernel (fused, no stats update)
        return F.batch_norm(x, mean, var, self.weight, self.bias, training=False, eps=self.eps)

    @torch.no_grad()
    def commit(self) -> None:
        """Move the running statistics towards the mean of the batch statistics seen since the last commit."""
        if not self._pending:
            return
        mean = torch.stack([m for m, _ in self._pending]).mean(dim=0)
        var = torch.stack([v for _, v in self._pending]).mean(dim=0)
        self.running_mean.mul_(1 - self.alpha).add_(mean, alpha=self.alpha)
        self.running_var.mul_(1 - self.alpha).add_(var, alpha=self.alpha)
        self._pending.clear()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, alpha={self.alpha:.4f}, affine={self.weight is not None}"
        )


def convert_to_momentum_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm*d / SyncBatchNorm in ``module`` (in place) by a :class:`MomentumBatchNorm`."""
    if isinstance(module, _BatchNorm):
        return MomentumBatchNorm.from_batchnorm(module)
    for name, child in module.named_children():
        new = convert_to_momentum_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def make_teacher(student: nn.Module, momentum_bn: bool = True) -> nn.Module:
    """A frozen deep copy of ``student`` (with momentum BN if ``momentum_bn``): the EMA teacher at step 0."""
    teacher = copy.deepcopy(student)
    if momentum_bn:
        teacher = convert_to_momentum_batchnorm(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_teacher <- m theta_teacher + (1 - m) theta_student`` for every parameter, matched by name.

    Buffers are not touched: the teacher keeps its own (momentum) batch-norm statistics.
    """
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        diff = sorted(set(t_params) ^ set(s_params))[:5]
        raise ValueError(f"teacher and student parameters differ: {diff}")
    names = list(t_params)
    t = [t_params[n].data for n in names]
    s = [s_params[n].detach().to(t_params[n].dtype) for n in names]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def set_statistics_momentum(module: nn.Module, alpha: float) -> None:
    """Set ``alpha`` (weight of the current batch) of every :class:`MomentumBatchNorm` in ``module``."""
    for m in module.modules():
        if isinstance(m, MomentumBatchNorm):
            m.alpha = float(alpha)


def commit_statistics(module: nn.Module) -> None:
    """Update the running statistics of every :class:`MomentumBatchNorm` once (after both views)."""
    for m in module.modules():
        if isinstance(m, MomentumBatchNorm):
            m.commit()
