"""The 2D UNet of SSL4MIS / BCP, run slice by slice on the 3D patches of the segmentation trainer.

Architecture (``model.network: unet2d``) follows the ``UNet`` of SSL4MIS
``code/networks/unet.py`` (HiLab-git/SSL4MIS, from PyMIC), which BCP's ACDC experiments use
unchanged (DeepMed-Lab-ECNU/BCP ``code/networks/unet.py``, ``UNet_2dBCP``):

* encoder: five stages of widths ``w·(1, 2, 4, 8, 16)`` (SSL4MIS ``feature_chns =
  [16, 32, 64, 128, 256]``: ``w = 16``); stages 2–5 start with a 2×2 max-pool. Each stage is a
  ``ConvBlock``: conv3×3 → BatchNorm → LeakyReLU(0.01) → Dropout(p) → conv3×3 → BatchNorm →
  LeakyReLU, with p = 0.05, 0.1, 0.2, 0.3, 0.5 from the first stage to the deepest (SSL4MIS
  ``dropout``; element-wise ``nn.Dropout`` as theirs). ``dropout=False`` turns all five off.
* decoder: four stages, each a 1×1 conv halving the channels → bilinear ×2 upsampling
  (``align_corners=True``; SSL4MIS ``bilinear: True``, BCP's only ``UpBlock``) → concatenation
  ``[skip, upsampled]`` → ConvBlock without dropout.
* output: conv3×3 to the class logits (SSL4MIS ``out_conv``).

Parameters: ``ConvBlock(a, b)`` has ``9ab + 9b² + 6b`` (two biased convs, two BatchNorms), an
up stage ``(c, c/2)`` has ``c·c/2 + c/2`` (the 1×1 conv) plus ``ConvBlock(c, c/2)``, the output
conv ``9wK + K``. For SSL4MIS's configuration (``w = 16``, one input channel) that is
``1,813,184 + 145·K``: 1,813,764 for ACDC's K = 4 classes (the "1.81M" reported for this UNet).

Slice-wise: :class:`UNet2D` takes the same ``(B, C, D, H, W)`` tensors as the VNet and returns
``(B, K, D, H, W)`` logits, like it, so crops, sliding windows, export and scoring stay the 3D
pipeline's. It folds the depth into the batch — ``(B·D, C, H, W)`` through the 2D network, then
back — so each axial slice (index ``z``, the first array axis, :mod:`medssl` convention) is
segmented on its own: nothing crosses slices, and a patch of depth 1 (``data.patch: [1, H, W]``)
is exactly SSL4MIS's / BCP's slice-wise ACDC training (each crop one slice) and inference (the
sliding window steps one slice at a time). BatchNorm statistics are then taken over the
``B·D`` slices of a batch, as over SSL4MIS's batch of slices. A ``(B, C, H, W)`` input runs the
2D network directly. ``H`` and ``W`` must be multiples of 16 (four max-pools); ``D`` is free.

Spacing: the network never sees the z spacing (it convolves within slices only), but
``data.spacing_mm`` still defines the model grid every volume is resampled to, along z too.
For slice-wise data (ACDC: 5–10 mm between slices), set its z entry to the data's own slice
spacing, so that resampling keeps the acquired slices instead of interpolating between them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DROPOUT", "UNet2D"]

#: Dropout of the five encoder stages, shallowest first (SSL4MIS ``dropout``).
DROPOUT: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
#: In-plane edges must be multiples of this (four 2×2 max-pools).
DIVISOR = 16


class _ConvBlock(nn.Module):
    """conv3×3 → BN → LeakyReLU → Dropout(p) → conv3×3 → BN → LeakyReLU (SSL4MIS ``ConvBlock``)."""

    def __init__(self, cin: int, cout: int, p: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.LeakyReLU(),
            nn.Dropout(p) if p > 0 else nn.Identity(),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _Up(nn.Module):
    """1×1 conv ``cin → cout`` → bilinear ×2 → concat with the skip → ConvBlock(2·cout, cout)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(cin, cout, 1)
        self.conv = _ConvBlock(2 * cout, cout, 0.0)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet2D(nn.Module):
    """SSL4MIS's 2D UNet applied to every axial slice of a 3D patch.

    ``forward(image (B, C, D, H, W)) -> logits (B, K, D, H, W)``; ``(B, C, H, W) -> (B, K, H, W)``.

    Args:
        n_classes: output classes ``K`` (background included).
        width: channels of the first stage (SSL4MIS: 16); stage ``i`` has ``width·2^i``.
        in_channels: image channels ``C``.
        dropout: the encoder dropouts :data:`DROPOUT` (off: none).
    """

    def __init__(
        self, n_classes: int, *, width: int = 16, in_channels: int = 1, dropout: bool = True
    ) -> None:
        super().__init__()
        if n_classes < 1 or width < 1 or in_channels < 1:
            raise ValueError(
                f"n_classes, width and in_channels must be >= 1, got {n_classes}, {width}, "
                f"{in_channels}"
            )
        self.n_classes, self.width, self.in_channels = n_classes, width, in_channels
        w = [width * 2**i for i in range(5)]
        p = DROPOUT if dropout else (0.0,) * 5
        self.encoder = nn.ModuleList(
            _ConvBlock(in_channels if i == 0 else w[i - 1], w[i], p[i]) for i in range(5)
        )
        self.decoder = nn.ModuleList(_Up(w[4 - i], w[3 - i]) for i in range(4))
        self.out = nn.Conv2d(width, n_classes, 3, padding=1)

    def forward_2d(self, image: torch.Tensor) -> torch.Tensor:
        """The 2D network: ``(N, C, H, W)`` slices → ``(N, K, H, W)`` logits."""
        h, w = image.shape[-2:]
        if h % DIVISOR or w % DIVISOR:
            raise ValueError(
                f"UNet2D needs in-plane edges that are multiples of {DIVISOR} (four max-pools), "
                f"got {h}x{w}"
            )
        features, x = [], image
        for i, stage in enumerate(self.encoder):
            x = stage(F.max_pool2d(x, 2) if i else x)
            features.append(x)
        x = features[-1]
        for i, up in enumerate(self.decoder):
            x = up(x, features[3 - i])
        return self.out(x)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim == 4:
            return self.forward_2d(image)
        if image.ndim != 5:
            raise ValueError(
                "UNet2D takes (B, C, D, H, W) or (B, C, H, W) images, got shape "
                f"{tuple(image.shape)}"
            )
        b, c, d, h, w = image.shape
        slices = image.transpose(1, 2).reshape(b * d, c, h, w)
        logits = self.forward_2d(slices)
        return logits.reshape(b, d, self.n_classes, h, w).transpose(1, 2)
