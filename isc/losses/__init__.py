"""Losses, one per module (as in ``lightly``): fine-tuning on copies (``triplet``, ``d2lv``,
``infonce_entropy``, ``contrastive``, ``xbm``) and self-supervised pretraining (``barlow_twins``, ``byol``).

Each loss class declares what it consumes (``inputs``, and ``needs_classifier`` for fine-tuning losses), so
the training modules wire and check losses by these attributes, not by their types. Shared geometry lives in
``pairwise``.
"""

from isc.losses.barlow_twins import BarlowTwinsLoss
from isc.losses.byol import BYOLLoss
from isc.losses.contrastive import ContrastiveLoss
from isc.losses.d2lv import D2LVLoss
from isc.losses.infonce_entropy import InfoNCEEntropyLoss
from isc.losses.triplet import TripletLoss
from isc.losses.xbm import CrossBatchMemory

__all__ = [
    "BYOLLoss",
    "BarlowTwinsLoss",
    "ContrastiveLoss",
    "CrossBatchMemory",
    "D2LVLoss",
    "InfoNCEEntropyLoss",
    "TripletLoss",
]
