"""The network as evaluation runs it: the trained descriptor model with the settings' test-time changes.

D2LV's test code does not evaluate the network it trained as is (``Test/final/V5_baseline_CC/
extract_features.py``): it swaps the learned GeM for a fresh one with p = 3 (lines 49 / 63 / 77,
``--GeM_p 3`` in every ``extract_*.sh``) and takes the BN neck's output (lines 220-222) unnormalised to the
PCA (line 254), L2-normalising only after it (line 266). Both the test stage and the per-epoch callback
call :func:`evaluated_model`, so the number logged during training is the number ``task=evaluate`` prints.
"""

from __future__ import annotations

import copy

from torch import nn

from isc.evaluation.settings import EvaluationSettings
from isc.models.descriptor import DescriptorModel
from isc.models.pooling import GeM

__all__ = ["evaluated_model"]


def evaluated_model(model: nn.Module, settings: EvaluationSettings) -> nn.Module:
    """``model`` with ``evaluation.gem_p`` (a fresh, frozen GeM) and ``evaluation.whitening.raw`` (no L2 norm
    before the whitening) applied; ``model`` itself when neither is set. The weights are shared, not
    copied, and ``model`` is left unchanged."""
    raw = settings.whitening.enabled and settings.whitening.raw
    if settings.gem_p is None and not raw:
        return model
    if not isinstance(model, DescriptorModel):
        raise TypeError(
            f"evaluation.gem_p / evaluation.whitening.raw change a DescriptorModel's pooling and L2 norm; "
            f"{type(model).__name__} has neither: set evaluation.gem_p=null evaluation.whitening.raw=false"
        )
    tested = copy.copy(model)  # a new attribute dict, the same submodules and weights
    tested._modules = dict(model._modules)  # so replacing the pooling leaves ``model``'s alone
    if settings.gem_p is not None:
        old = model.pooling
        tested.pooling = GeM(p=settings.gem_p, eps=getattr(old, "eps", 1e-6)).to(model.mean.device)
    if raw:
        tested.normalize = False
    return tested
