"""Optimisers and learning-rate schedules for large-batch self-supervised pretraining.

- :class:`LARS` (You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks", 2017) as
  used by Barlow Twins: per-layer trust ratio ``eta ||w|| / ||g + wd w||``; biases and norm parameters
  are usually excluded from both weight decay and the adaptation (their own param group).
- :func:`param_groups` splits a model into weights and biases/norm parameters with their own lr.
- :class:`WarmupCosineLR`: linear warm-up, optional flat phase, then cosine decay, stepped per optimiser step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LARS", "WarmupCosineLR", "param_groups", "warmup_cosine_factor"]


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling, exactly as in official Barlow Twins.

    Per parameter: ``g <- grad + wd * w``; if the group's ``lars_adaptation`` is true,
    ``g <- g * eta ||w|| / ||g||`` (1 when either norm is 0); ``mu <- momentum * mu + g``; ``w <- w - lr * mu``.
    Groups from :func:`param_groups` set ``weight_decay = 0`` and ``lars_adaptation = False`` for biases
    and norm parameters, which the paper excludes.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
        lars_adaptation: bool = True,
    ) -> None:
        if lr < 0 or weight_decay < 0 or momentum < 0 or eta < 0:
            raise ValueError(
                f"LARS: negative hyper-parameter (lr={lr}, wd={weight_decay}, m={momentum}, eta={eta})"
            )
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "eta": eta,
            "lars_adaptation": lars_adaptation,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if group["weight_decay"]:
                    dp = dp.add(p, alpha=group["weight_decay"])
                if group["lars_adaptation"]:
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])
        return loss


def _is_bias_or_norm(name: str, p: torch.Tensor, norm_params: set[int]) -> bool:
    return p.ndim <= 1 or id(p) in norm_params or name.endswith(".bias")


def param_groups(
    model: nn.Module,
    lr: float,
    lr_bias_norm: float | None = None,
    exclude_bias_and_norm: bool = True,
) -> list[dict[str, Any]]:
    """Split trainable parameters into ``weights`` and ``bias_norm`` groups (biases, norm layers, scalars).

    ``lr_bias_norm`` (default ``lr``) is the second group's lr (Barlow Twins: 0.2 vs 0.0048 per 256).
    With ``exclude_bias_and_norm`` that group gets ``weight_decay = 0`` and ``lars_adaptation = False``;
    otherwise it keeps the optimiser's defaults. Empty groups are dropped.
    """
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm_params = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(False)}
    norm_params |= {
        id(p) for m in model.modules() if type(m).__name__ == "MomentumBatchNorm" for p in m.parameters(False)
    }
    weights: list[nn.Parameter] = []
    others: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (others if _is_bias_or_norm(name, p, norm_params) else weights).append(p)
    bias_group: dict[str, Any] = {
        "name": "bias_norm",
        "params": others,
        "lr": lr if lr_bias_norm is None else lr_bias_norm,
    }
    if exclude_bias_and_norm:
        bias_group.update(weight_decay=0.0, lars_adaptation=False)
    groups = [{"name": "weights", "params": weights, "lr": lr}, bias_group]
    return [g for g in groups if g["params"]]


def warmup_cosine_factor(
    step: int, total_steps: int, warmup_steps: int = 0, final_factor: float = 0.0, flat_steps: int = 0
) -> float:
    """LR multiplier at ``step``: linear ``step / warmup`` warm-up, ``flat_steps`` at 1, then cosine to ``final_factor``.

    With ``flat_steps = 0`` and ``final_factor = 0.001`` this is the official Barlow Twins schedule; D2LV's
    fine-tuning (warm-up, flat, cosine) sets ``flat_steps``. At ``step >= total_steps`` the factor is
    ``final_factor``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    start = warmup_steps + flat_steps
    if step < start:
        return 1.0
    decay_steps = max(total_steps - start, 1)
    q = 0.5 * (1 + math.cos(math.pi * min(step - start, decay_steps) / decay_steps))
    return q + final_factor * (1 - q)


class WarmupCosineLR(LambdaLR):
    """Per-step warm-up (+ optional flat phase) + cosine schedule on every param group's initial lr.

    Phases are given in epochs (needs ``steps_per_epoch``) or steps; the Lightning modules pass
    ``total_steps`` and ``steps_per_epoch`` from the trainer, so configs only name epochs. See
    :func:`warmup_cosine_factor`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        steps_per_epoch: int | None = None,
        warmup_epochs: float = 0.0,
        warmup_steps: int | None = None,
        final_factor: float = 0.0,
        flat_epochs: float = 0.0,
        flat_steps: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        self.total_steps = int(total_steps)
        self.warmup_steps = min(self._steps(warmup_steps, warmup_epochs, steps_per_epoch), self.total_steps)
        self.flat_steps = min(
            self._steps(flat_steps, flat_epochs, steps_per_epoch), self.total_steps - self.warmup_steps
        )
        self.final_factor = final_factor
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    @staticmethod
    def _steps(steps: int | None, epochs: float, steps_per_epoch: int | None) -> int:
        if steps is not None:
            return int(steps)
        if epochs and not steps_per_epoch:
            raise ValueError("a phase given in epochs needs steps_per_epoch")
        return round(epochs * steps_per_epoch) if epochs and steps_per_epoch else 0

    def _factor(self, step: int) -> float:
        return warmup_cosine_factor(
            step, self.total_steps, self.warmup_steps, self.final_factor, self.flat_steps
        )
