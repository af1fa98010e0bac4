"""The segmentation network of an experiment, built from its config or from a checkpoint.

Training, testing and ``medssl-export`` all build the network here, so the three agree on
what a ``medssl.segmenter`` checkpoint's ``model`` weights belong to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from medssl.training.networks.unet2d import UNet2D
from medssl.training.networks.vnet import DiffVNet, VNet

if TYPE_CHECKING:
    from medssl.training.segmentation.config import SegmentationExperiment

__all__ = ["build_segmenter", "inference_net"]


def build_segmenter(cfg: SegmentationExperiment, n_classes: int) -> nn.Module:
    """The trained network: :class:`DiffVNet` for A&D; for the other methods :class:`VNet`, or
    :class:`UNet2D` slice by slice with ``model.network: unet2d``."""
    if cfg.method == "ad":
        return DiffVNet(cfg.model, n_classes, diffusion=cfg.ad.diffusion)
    m = cfg.model
    if m.network == "unet2d":
        return UNet2D(n_classes, width=m.width, in_channels=m.in_channels, dropout=m.dropout)
    return VNet(m, n_classes)


def inference_net(state: Mapping[str, Any]) -> nn.Module:
    """The test-time network of a segmenter checkpoint (``config``, ``classes`` and ``model``
    entries; D_θ path for A&D), eval mode, on the CPU."""
    from medssl.config import config_from_dict
    from medssl.training.segmentation.config import SegmentationExperiment

    cfg = config_from_dict(SegmentationExperiment, state["config"])
    net = build_segmenter(cfg, len(state["classes"]))
    net.load_state_dict(state["model"])
    return net.eval()
