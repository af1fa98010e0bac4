"""The 3D feature-pyramid nodule detector of FocalMix (paper §2.1, §4.1).

A 3D residual backbone (basic blocks, each stage halving the resolution) feeds a
feature pyramid (lateral 1x1x1 convolutions, nearest-neighbour top-down upsampling,
3x3x3 smoothing). A head shared across levels predicts, for every anchor, an objectness
logit and the regression ``(dz, dy, dx, dd)`` of :func:`medssl.detection.encode_boxes`.

The paper's network has 20 basic residual blocks and outputs at strides 2, 4, 8, 16
(:data:`PAPER`); :data:`CPU_SMALL` is a narrow, shallow variant that trains on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from medssl.detection import AnchorGrid, AnchorSpec

__all__ = ["DetectorConfig", "DetectorInference", "FPNDetector", "decode_boxes", "flatten_levels"]

#: Objectness prior at initialisation (RetinaNet §4.1): the bias makes p = 0.01 everywhere,
#: so the first steps are not swamped by the loss of ~10^5 background anchors.
PRIOR_PROBABILITY = 0.01
#: Largest predicted log-scale ``dd``: boxes at most e^4 (~55x) their anchor.
MAX_LOG_SCALE = 4.0


@dataclass(frozen=True)
class DetectorConfig:
    """Network shape.

    Attributes:
        widths: channels of each backbone stage; stage ``i`` has stride ``2**(i+1)``.
        blocks: basic residual blocks per stage.
        stem_width: channels of the full-resolution stem convolution.
        fpn_width: channels of every pyramid level.
        head_width: channels of the shared head's hidden convolution.
    """

    widths: tuple[int, ...] = (32, 64, 128, 128, 128)
    blocks: tuple[int, ...] = (2, 4, 6, 6, 2)
    stem_width: int = 16
    fpn_width: int = 64
    head_width: int = 64

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(f"widths {self.widths} and blocks {self.blocks} must pair up")
        if min(self.widths + self.blocks + (self.stem_width, self.fpn_width, self.head_width)) < 1:
            raise ValueError("widths, blocks and channel counts must be positive")

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(2 ** (i + 1) for i in range(len(self.widths)))


#: The paper's network: 20 basic residual blocks, five stages (strides 2..32, outputs 2..16).
PAPER = DetectorConfig()
#: A CPU-sized variant (8 blocks) for tests, demos and CPU benchmarks.
CPU_SMALL = DetectorConfig(
    widths=(8, 16, 24, 32), blocks=(1, 2, 3, 2), stem_width=8, fpn_width=16, head_width=16
)


def _conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm3d(cout),
    )


class BasicBlock(nn.Module):
    """3D residual basic block (He et al. 2016): two 3x3x3 convolutions and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride)
        self.conv2 = _conv_bn(cout, cout)
        self.shortcut = (
            _conv_bn(cin, cout, stride, kernel=1) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class FPNDetector(nn.Module):
    """Backbone + FPN + shared head.

    ``forward(x)`` takes ``(B, 1, Z, Y, X)`` patches (edges divisible by the largest
    backbone stride) and returns one ``(B, 5, Z/s, Y/s, X/s)`` map per anchor level,
    channel 0 the objectness logit and 1..4 the box regression.
    """

    def __init__(self, config: DetectorConfig, anchors: AnchorSpec) -> None:
        super().__init__()
        missing = set(anchors.strides) - set(config.strides)
        if missing:
            raise ValueError(
                f"anchor strides {sorted(missing)} are not backbone strides {config.strides}"
            )
        self.config, self.anchors = config, anchors
        self.stem = nn.Sequential(_conv_bn(1, config.stem_width), nn.ReLU(inplace=True))
        stages, cin = [], config.stem_width
        for width, n in zip(config.widths, config.blocks):
            stages.append(
                nn.Sequential(
                    BasicBlock(cin, width, 2), *(BasicBlock(width, width) for _ in range(n - 1))
                )
            )
            cin = width
        self.stages = nn.ModuleList(stages)
        self.lateral = nn.ModuleList(nn.Conv3d(w, config.fpn_width, 1) for w in config.widths)
        self.smooth = nn.ModuleList(
            nn.Conv3d(config.fpn_width, config.fpn_width, 3, padding=1) for _ in anchors.strides
        )
        self.head = nn.Sequential(
            nn.Conv3d(config.fpn_width, config.head_width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv3d(config.head_width, 5, 1),
        )
        nn.init.normal_(self.head[-1].weight, std=0.01)
        nn.init.zeros_(self.head[-1].bias)
        nn.init.constant_(
            self.head[-1].bias[0], -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features, out = [], self.stem(x)
        for stage in self.stages:
            out = stage(out)
            features.append(out)
        top = self.lateral[-1](features[-1])
        pyramid: dict[int, torch.Tensor] = {self.config.strides[-1]: top}
        for i in range(len(features) - 2, -1, -1):
            top = self.lateral[i](features[i]) + F.interpolate(
                top, size=features[i].shape[2:], mode="nearest"
            )
            pyramid[self.config.strides[i]] = top
        return [
            self.head(smooth(pyramid[s])) for s, smooth in zip(self.anchors.strides, self.smooth)
        ]


def flatten_levels(levels: list[torch.Tensor]) -> torch.Tensor:
    """Per-level maps ``(B, C, z, y, x)`` → ``(B, N, C)`` in the flat anchor order of
    :class:`medssl.detection.AnchorGrid` (level by level, C order)."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in levels], dim=1)


def decode_boxes(deltas: torch.Tensor, centres: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`medssl.detection.encode_boxes`.

    Args:
        deltas: ``(B, N, 4)`` predicted ``(dz, dy, dx, dd)``.
        centres: ``(N, 3)`` anchor centres, voxels; sizes: ``(N,)`` anchor edges.

    Returns:
        ``(B, N, 4)`` cubes ``(z, y, x, d)`` in the patch's voxel frame.
    """
    size = sizes[:, None]
    centre = centres + deltas[..., :3] * size
    edge = sizes * torch.exp(deltas[..., 3].clamp(max=MAX_LOG_SCALE))
    return torch.cat([centre, edge[..., None]], dim=-1)


class DetectorInference(nn.Module):
    """The detector with anchor decoding, for a fixed window shape.

    ``forward(x)`` maps ``(B, 1, Z, Y, X)`` to ``boxes (B, N, 4)`` (voxels, the patch
    frame) and ``scores (B, N)`` (probabilities): the output contract of
    :class:`medssl.pipeline.detect.DetectionRunner`, and the graph that export writes.
    """

    def __init__(self, detector: FPNDetector, window: tuple[int, int, int]) -> None:
        super().__init__()
        self.detector = detector
        grid = AnchorGrid.build(detector.anchors, window)
        self.register_buffer("centres", torch.from_numpy(grid.centres), persistent=False)
        self.register_buffer("sizes", torch.from_numpy(grid.sizes), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = flatten_levels(self.detector(x))
        return decode_boxes(flat[..., 1:], self.centres, self.sizes), torch.sigmoid(flat[..., 0])
