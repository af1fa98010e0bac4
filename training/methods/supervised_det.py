"""``supervised-det``: the fully supervised detector baseline (labeled scans only)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from medssl.training.detection.config import DetectionExperiment
from medssl.training.detection.losses import detection_loss
from medssl.training.methods.base import Batch, DetectionMethod
from medssl.training.networks.detector import flatten_levels

__all__ = ["SupervisedDetection", "supervised_step"]


def supervised_step(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: DetectionExperiment
) -> dict[str, torch.Tensor]:
    """Focal loss + smooth L1 on a labeled batch (the fully supervised baseline)."""
    out = flatten_levels(model(batch["image"]))
    return detection_loss(
        out.float(), batch["labels"], batch["deltas"], batch["labels"] == 1, cfg.loss
    )


class SupervisedDetection(DetectionMethod):
    """The FPN detector trained on labeled patches only."""

    uses_unlabeled: ClassVar[bool] = False

    def step(self, step: int, batch: Batch) -> dict[str, torch.Tensor]:
        return supervised_step(self.model, batch.labeled, self.cfg)
