"""Embedding heads for fine-tuning: D2LV's feature-band WaveBlock and BN-neck head, SSCD's projection.

Pure PyTorch. Heads take the pooled (B, in_dim) backbone output; the test-time descriptor is always
L2-normalised so inner product = cosine similarity, as the ISC descriptor track and faiss search expect.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BNNeckHead", "ProjectionHead", "WaveBlock"]


class WaveBlock(nn.Module):
    """WaveBlock (Wang, Zhao, Liao & Shao, "Attentive WaveBlock: Complementarity-enhanced Mutual Networks
    for Unsupervised Domain Adaptation in Person Re-identification and Beyond", TIP 2022, arXiv 2006.06525),
    placed by D2LV (same first author) after ResNet layer2 and layer3 during training.

    x (B, C, H, W) -> (B, C, H, W). In training mode a band of ``round(ratio * H)`` consecutive rows, at a
    uniformly random start, keeps its values and every other row is multiplied by ``factor``: unlike
    erasing, no information is destroyed, but the relative weight of image regions changes from step to
    step, so the network cannot rely on any one horizontal strip (a copy may be cropped or overlaid
    anywhere). Identity in eval mode.

    D2LV's code uses ``factor=1.5`` and one band for the whole batch; ``per_sample=True`` (default) draws
    one band per sample, ``per_sample=False`` reproduces D2LV exactly. The start rows come from torch's
    global CPU generator, so results are reproducible under ``torch.manual_seed``.
    """

    def __init__(self, ratio: float = 0.3, factor: float = 1.5, per_sample: bool = True) -> None:
        super().__init__()
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        self.ratio = ratio
        self.factor = factor
        self.per_sample = per_sample

    def band_mask(self, batch: int, height: int) -> torch.Tensor:
        """(batch or 1, height) bool mask on the CPU: True on the rows of each sample's kept band."""
        band = round(self.ratio * height)
        starts = torch.randint(0, height - band + 1, (batch if self.per_sample else 1,))
        rows = torch.arange(height)
        return (rows >= starts.unsqueeze(1)) & (rows < (starts + band).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if x.ndim != 4:
            raise ValueError(f"expected (B, C, H, W), got {tuple(x.shape)}")
        keep = self.band_mask(x.shape[0], x.shape[2]).to(x.device)
        scale = torch.where(keep, 1.0, self.factor).to(x.dtype)  # (B or 1, H)
        return x * scale[:, None, :, None]

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, factor={self.factor}, per_sample={self.per_sample}"


class BNNeckHead(nn.Module):
    """D2LV's head: MLP ``in_dim -> hidden_dims -> out_dim``, a BN neck, and a bias-free classifier.

    forward(pooled (B, in_dim)) -> dict with
      - ``features``    (B, out_dim): the MLP output *before* the neck, for the triplet loss;
      - ``bn_features`` (B, out_dim): after ``BatchNorm1d`` with a frozen zero bias, for the classifier
        and the descriptor;
      - ``logits``      (B, num_classes), or None when ``num_classes == 0``.

    BNNeck (Luo et al. 2019, "Bag of Tricks and A Strong Baseline for Deep Person Re-identification"):
    the triplet loss shapes a Euclidean space while the softmax wants an angular one; normalising
    between them lets both converge. The frozen bias keeps the neck output centred for the bias-free
    classifier. D2LV: 2048 -> 4096 -> 8192 (hidden Linear + BN + LeakyReLU(0.2); ``negative_slope=0``
    for ReLU), 100k classes (D2LV splits that classifier in four Linear layers for memory; the same map).
    Classifier init N(0, 0.001) as in D2LV / fast-reid; neck BN weight 1, bias 0.
    """

    def __init__(
        self,
        in_dim: int = 2048,
        hidden_dims: Sequence[int] = (4096,),
        out_dim: int = 8192,
        num_classes: int = 0,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(dim, hidden), nn.BatchNorm1d(hidden)]
            layers.append(
                nn.LeakyReLU(negative_slope, inplace=True) if negative_slope else nn.ReLU(inplace=True)
            )
            dim = hidden
        layers.append(nn.Linear(dim, out_dim))
        self.mlp = nn.Sequential(*layers)
        self.neck = nn.BatchNorm1d(out_dim)
        nn.init.ones_(self.neck.weight)
        nn.init.zeros_(self.neck.bias)
        self.neck.bias.requires_grad_(False)
        self.classifier: nn.Linear | None = None
        if num_classes > 0:
            self.classifier = nn.Linear(out_dim, num_classes, bias=False)
            nn.init.normal_(self.classifier.weight, std=0.001)
        self.in_dim = in_dim
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.out_dim = out_dim
        self.negative_slope = negative_slope
        self.num_classes = num_classes

    @property
    def descriptor_dim(self) -> int:
        """Dimension of :meth:`descriptor` (= ``out_dim``)."""
        return self.out_dim

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor | None]:
        features = self.mlp(pooled)
        bn_features = self.neck(features)
        logits = self.classifier(bn_features) if self.classifier is not None else None
        return {"features": features, "bn_features": bn_features, "logits": logits}

    def descriptor(self, pooled: torch.Tensor) -> torch.Tensor:
        """Test-time descriptor (B, in_dim) -> (B, out_dim): the L2-normalised BN-neck output."""
        return F.normalize(self.raw_descriptor(pooled), dim=1)

    def raw_descriptor(self, pooled: torch.Tensor) -> torch.Tensor:
        """The BN-neck output before its L2 norm, (B, in_dim) -> (B, out_dim): what D2LV's test code
        PCA-whitens (``evaluation.whitening.raw``)."""
        return self.neck(self.mlp(pooled))

    embed = descriptor

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_classes={self.num_classes}"


class ProjectionHead(nn.Module):
    """SSCD-style projection (Pizzi et al., CVPR 2022): ``Linear (+ BatchNorm1d)`` then L2 normalisation.

    (B, in_dim) -> (B, out_dim) unit vectors, ready for :func:`isc.losses.infonce_entropy.infonce_loss` and for
    inner-product search. SSCD: GeM(2048) -> Linear -> 512-d. The Linear drops its bias when BN follows
    (BN's shift makes it redundant).
    """

    def __init__(self, in_dim: int = 2048, out_dim: int = 512, batch_norm: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=not batch_norm)
        self.bn: nn.BatchNorm1d | None = nn.BatchNorm1d(out_dim) if batch_norm else None
        self.in_dim = in_dim
        self.out_dim = out_dim

    @property
    def descriptor_dim(self) -> int:
        return self.out_dim

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.raw_descriptor(pooled), dim=1)

    def raw_descriptor(self, pooled: torch.Tensor) -> torch.Tensor:
        """The projection before its L2 norm, (B, in_dim) -> (B, out_dim)."""
        x = self.linear(pooled)
        if self.bn is not None:
            x = self.bn(x)
        return x

    def descriptor(self, pooled: torch.Tensor) -> torch.Tensor:
        """Same as ``forward``: the output is already the normalised descriptor."""
        out: torch.Tensor = self(pooled)
        return out

    embed = descriptor

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, batch_norm={self.bn is not None}"
