"""The segmentation network of an experiment, built from its config or from a checkpoint.

Training, testing and ``medssl-export`` all build the network here, so the three agree on
what a ``medssl.segmenter`` checkpoint's ``model`` weights belong to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medssl.training.networks.unet2d import UNet2D
from medssl.training.networks.vnet import DiffVNet, VNet

if TYPE_CHECKING:
    from medssl.training.segmentation.config import SegmentationExperiment

__all__ = ["build_segmenter", "inference_net", "place"]


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


def place(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` on ``device``; on the CPU, its 5-D tensors (the 3D convolutions' weights) in the
    channels-last layout (N, D, H, W, C in memory, shapes unchanged).

    oneDNN's 3D convolutions run in that layout: a width-8 VNet training step on 16×48×48 crops
    takes about a fifth less time in it (``benchmarks/seg_layout.py``). Activations follow the
    weights' layout; the arithmetic is the same up to floating-point summation order. On other
    devices the layout is left alone (cuDNN chooses its own).
    """
    net = net.to(device)
    if device.type == "cpu" and any(isinstance(m, nn.Conv3d) for m in net.modules()):
        for t in [*net.parameters(), *net.buffers()]:
            if t.dim() == 5:
                t.data = t.data.contiguous(memory_format=torch.channels_last_3d)
    return net
