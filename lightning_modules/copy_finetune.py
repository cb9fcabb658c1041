"""Metric fine-tuning on classes of copies: D2LV (GeM + BN-neck head, 10 x CE + triplet) or SSCD-style losses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from isc.models.heads import WaveBlock
from isc.models.trunks import Trunk
from lightning_modules.base import BackboneModule, OptimizerFactory, SchedulerFactory

FINETUNING_LOSSES = "model/loss=d2lv, model/loss=infonce_entropy or model/loss=contrastive_xbm"


class CopyFinetune(BackboneModule):
    """Backbone -> GeM -> head -> loss, trained on P x K batches of copies (``datamodules.copies``).

    - ``head``: a partial of ``isc.models.heads.BNNeckHead`` (D2LV) or ``isc.models.heads.ProjectionHead`` (SSCD), completed
      with the trunk's width, or ``None`` (the pooled feature is the descriptor). The descriptor is the
      head's L2-normalised output.
    - ``loss``: a module returning ``{"loss": total, <component>: ...}``. A loss declaring
      ``needs_classifier = True`` (D2LV) gets the pooled feature (D2LV's triplet input) and the classifier
      logits; every other loss gets the L2-normalised descriptors. That classifier is sized from the
      datamodule's number of classes: on the BN neck of a ``BNNeckHead``, or on the pooled feature when
      there is no head (the descriptor then stays the L2-normalised pooled feature). Losses declaring other
      ``inputs`` (pretraining losses) are refused at construction.
    - ``waveblock``: feature-band erasing (D2LV) applied during training to the outputs of the trunk
      modules named in ``waveblock_after`` (ResNet: ``layer2``, ``layer3``).

    Learning rates are absolute unless ``base_batch_size`` is set (D2LV: Adam 3.5e-4 at 128 images).
    ``freeze_bn_stats`` keeps the trunk's batch-norm running statistics fixed (affine parameters still
    train): small CPU batches would otherwise drag the pretrained statistics around.
    """

    task = "finetune"  # the run.py task this module serves (checked before training)
    loss_inputs = "labelled_embeddings"  # loss(descriptors, labels) or loss(features, logits, labels)

    def __init__(
        self,
        trunk: Trunk,
        pooling: nn.Module,
        loss: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        head: Callable[..., nn.Module] | None = None,
        waveblock: WaveBlock | None = None,
        waveblock_after: Sequence[str] = ("layer2", "layer3"),
        lr: float = 3.5e-4,
        lr_bias_norm: float | None = None,
        base_batch_size: int | None = None,
        exclude_bias_and_norm: bool = False,
        freeze_bn_stats: bool = False,
        image_size: int | None = None,
    ) -> None:
        # Pretraining losses take two or four projections, not descriptors and labels: fail before any work.
        self.check_loss(loss, "copy_finetune", FINETUNING_LOSSES)
        super().__init__(
            trunk, optimizer, scheduler, pooling, lr, lr_bias_norm, base_batch_size, exclude_bias_and_norm
        )
        # The head is a partial: its input width is the trunk's, known only once the trunk is built.
        self.freeze_bn_stats = freeze_bn_stats
        self.image_size = image_size  # the evaluation size, recorded in checkpoints and exports
        self.head = head(in_dim=trunk.out_channels) if head is not None else None
        self.needs_classifier = bool(getattr(loss, "needs_classifier", False))
        if self.needs_classifier and self.head is not None and not hasattr(self.head, "classifier"):
            raise ValueError(
                f"{type(loss).__name__} needs a classifier: a BN-neck head or none, not "
                f"{type(self.head).__name__}: set model.head._target_=isc.models.heads.BNNeckHead or model.head=null"
            )
        self.loss = loss
        # A classifier loss without a head: the classifier sits on the pooled feature (sized in setup), which
        # stays the descriptor, so the off-the-shelf figure before training is the backbone's own.
        self.classifier: nn.Linear | None = None
        self.waveblock = waveblock
        if waveblock is not None:
            self._hook_waveblocks(waveblock, waveblock_after)

    def _hook_waveblocks(self, waveblock: WaveBlock, names: Sequence[str]) -> None:
        modules = dict(self.backbone.trunk.named_modules())
        found = {n: m for n, m in modules.items() if n.split(".")[-1] in names}
        missing = set(names) - {n.split(".")[-1] for n in found}
        if missing:
            raise ValueError(f"waveblock_after names {sorted(missing)} not found in the trunk")
        for module in found.values():
            # Training only, by the hooked module's own mode: the test-time descriptor model shares the
            # trunk but not this module's WaveBlock, so its eval() must switch the erasing off.
            module.register_forward_hook(
                lambda m, _inputs, output: waveblock(output) if m.training else output
            )

    def on_train_epoch_start(self) -> None:
        if self.freeze_bn_stats:
            for module in self.backbone.trunk.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def setup(self, stage: str) -> None:
        """Size the classifier from the data: a classifier loss's softmax needs one output per training class."""
        if not self.needs_classifier or self.classifier is not None:
            return
        if self.head is not None and getattr(self.head, "classifier", None) is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        num_classes = getattr(datamodule, "num_classes", None)
        if not num_classes:
            raise ValueError(
                f"{type(self.loss).__name__} needs a classifier: the datamodule must expose num_classes"
            )
        in_dim = self.backbone.trunk.out_channels if self.head is None else int(self.head.out_dim)  # type: ignore[arg-type]
        classifier = nn.Linear(in_dim, int(num_classes), bias=False)
        nn.init.normal_(classifier.weight, std=0.001)
        if self.head is None:
            self.classifier = classifier
            return
        self.head.classifier = classifier
        self.head.num_classes = int(num_classes)  # type: ignore[assignment]  # a BNNeckHead int, not a Module

    @property
    def descriptor_head(self) -> nn.Module | None:
        return self.head

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Copy-detection descriptors: (B, 3, H, W) in [0, 1] -> (B, D), L2-normalised."""
        out: torch.Tensor = self.descriptor_model()(images)
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        pooled = self.backbone(images)
        if self.needs_classifier:
            if self.head is None:  # the classifier made in setup, on the pooled feature
                logits = self.classifier(pooled) if self.classifier is not None else None
                parts = self.loss(pooled, logits, labels)
            else:
                parts = self.loss(pooled, self.head(pooled)["logits"], labels)
        else:
            descriptors = (
                self.head.descriptor(pooled)  # type: ignore[operator]  # heads declare descriptor()
                if self.head is not None
                else F.normalize(pooled, dim=-1)
            )
            parts = self.loss(descriptors, labels)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, prog_bar=False, batch_size=len(labels))
        self.log("loss", parts["loss"], prog_bar=True, logger=False, batch_size=len(labels))
        return parts["loss"]
