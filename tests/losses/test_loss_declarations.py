"""The training modules wire a loss by what it declares (``inputs``, ``needs_classifier``), not by its type.

A user's own loss class that declares a classifier gets the pooled features and logits exactly as D2LV
does; one declaring another model's inputs is refused at construction; one declaring nothing is trusted.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from isc.losses.barlow_twins import BarlowTwinsLoss
from isc.losses.byol import BYOLLoss
from isc.losses.infonce_entropy import InfoNCEEntropyLoss
from isc.models.heads import BNNeckHead, ProjectionHead
from isc.models.pooling import GeM
from isc.models.trunks import Trunk
from lightning_modules.barlow_twins import BarlowTwins
from lightning_modules.copy_finetune import CopyFinetune
from lightning_modules.momentum2_teacher import Momentum2Teacher

NUM_CLASSES = 5


def tiny_trunk(channels: int = 6) -> Trunk:
    body = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2), nn.ReLU())
    return Trunk(body, channels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


class Recording(nn.Module):
    """A loss of no known type that records what the module passes to it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor | None, ...]] = []

    def forward(self, *args: torch.Tensor | None) -> dict[str, torch.Tensor]:
        self.calls.append(args)
        first = args[0]
        assert first is not None
        return {"loss": first.sum() * 0}


class ClassifierLoss(Recording):
    inputs: ClassVar[str] = "labelled_embeddings"
    needs_classifier: ClassVar[bool] = True


class ForeignLoss(Recording):
    inputs: ClassVar[str] = "something_else"


def finetune(loss: nn.Module, head: Any = None) -> CopyFinetune:
    torch.manual_seed(0)
    model = CopyFinetune(tiny_trunk(), GeM(), loss, optimizer=partial(torch.optim.SGD, lr=0.1), head=head)
    model.trainer = SimpleNamespace(datamodule=SimpleNamespace(num_classes=NUM_CLASSES))  # type: ignore[assignment]
    model.setup("fit")
    model.trainer = None  # type: ignore[assignment]  # outside a fit again: self.log only warns
    return model


def step(model: CopyFinetune) -> None:
    images, labels = torch.rand(4, 3, 12, 12), torch.tensor([0, 0, 1, 1])
    with pytest.warns(UserWarning, match="self.log"):  # outside a fit: logging is skipped, the step runs
        model.training_step((images, labels), 0)


@pytest.mark.parametrize("with_head", [False, True])
def test_a_declared_classifier_loss_gets_pooled_features_and_sized_logits(with_head: bool) -> None:
    head = partial(BNNeckHead, hidden_dims=[8], out_dim=4, num_classes=0) if with_head else None
    loss = ClassifierLoss()
    model = finetune(loss, head)
    step(model)
    ((features, logits, labels),) = loss.calls
    assert features is not None and logits is not None and labels is not None
    assert features.shape == (4, 6)  # the pooled feature, before any head
    assert not torch.allclose(features.norm(dim=1), torch.ones(4))
    assert logits.shape == (4, NUM_CLASSES) and labels.tolist() == [0, 0, 1, 1]
    classifier = model.head.classifier if with_head else model.classifier  # type: ignore[union-attr]
    assert isinstance(classifier, nn.Linear) and classifier.out_features == NUM_CLASSES


def test_an_undeclared_loss_gets_unit_descriptors_and_no_classifier() -> None:
    loss = Recording()
    model = finetune(loss, partial(ProjectionHead, out_dim=3))
    step(model)
    ((descriptors, labels),) = loss.calls
    assert descriptors is not None and descriptors.shape == (4, 3)
    torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(4))
    assert model.classifier is None


def test_a_classifier_loss_refuses_a_head_without_classifier() -> None:
    with pytest.raises(ValueError, match="ClassifierLoss needs a classifier"):
        finetune(ClassifierLoss(), partial(ProjectionHead, out_dim=3))


M2T_SMALL = {"projector_hidden_dim": 8, "projector_dim": 4, "predictor_hidden_dim": 8}
MODULES: dict[str, tuple[Any, dict[str, Any], type[nn.Module]]] = {
    "copy_finetune": (partial(CopyFinetune, pooling=GeM()), {}, InfoNCEEntropyLoss),
    "barlow_twins": (BarlowTwins, {"projector_dims": (8, 8)}, BarlowTwinsLoss),
    "momentum2_teacher": (Momentum2Teacher, M2T_SMALL, BYOLLoss),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_refuses_losses_declaring_other_inputs(name: str) -> None:
    make, kwargs, own = MODULES[name]
    build = partial(make, tiny_trunk(), optimizer=partial(torch.optim.SGD, lr=0.1), **kwargs)
    build(loss=own())  # its own loss
    build(loss=Recording())  # a loss that declares nothing is trusted
    for loss in (ForeignLoss(), *(other() for _, _, other in MODULES.values() if other is not own)):
        with pytest.raises(ValueError, match=f"model={name} cannot train with {type(loss).__name__}"):
            build(loss=loss)


def test_descriptors_of_the_default_loss_are_what_infonce_sees() -> None:
    """No head, InfoNCE: the loss is called on the L2-normalised pooled feature (the descriptor)."""
    model = finetune(InfoNCEEntropyLoss())
    images = torch.rand(4, 3, 12, 12)
    seen: list[torch.Tensor] = []
    model.loss.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    step_images, labels = images, torch.tensor([0, 0, 1, 1])
    with pytest.warns(UserWarning, match="self.log"):
        model.training_step((step_images, labels), 0)
    torch.testing.assert_close(seen[0], F.normalize(model(images), dim=-1))
