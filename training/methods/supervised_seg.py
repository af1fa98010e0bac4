"""``supervised-seg``: Dice + CE on the labeled crops only (the supervised baseline)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from medssl.training.methods.base import Batch, SegmentationMethod
from medssl.training.segmentation.losses import supervised_loss

__all__ = ["SupervisedSegmentation", "supervised_seg_step"]


def supervised_seg_step(
    model: nn.Module, labeled: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Dice + CE on the labeled crops."""
    loss = supervised_loss(model(labeled["image"]).float(), labeled)
    return {"loss": loss, "sup": loss}


class SupervisedSegmentation(SegmentationMethod):
    """The supervised baseline: the experiment's network, labeled crops only."""

    uses_unlabeled: ClassVar[bool] = False

    def step(self, step: int, batch: Batch) -> dict[str, torch.Tensor]:
        return supervised_seg_step(self.model, batch.labeled)
