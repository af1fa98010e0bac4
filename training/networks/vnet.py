"""VNet building blocks and the Diff-VNet of A&D (Wang & Li, NeurIPS 2023).

Follows the official ``code/DiffVNet/diff_vnet.py`` (xmed-lab/GenericSSL): a VNet with
four stride-2 downsamplings (width ``w, 2w, 4w, 8w, 16w``; the paper uses w = 32, so
32 → 512), BatchNorm, Dropout3d(0.1) after every convolution (``stage_dropout``), Dropout3d(0.5) on
the
deepest features and before the output convolution (when ``dropout`` is on), residual
additions (not concatenations) between encoder and decoder.

Time conditioning (the denoising branch only): a sinusoidal embedding of width 128, an MLP
128 → 512 → 512 with SiLU, projected per block and added to that block's output (the last
convolution of each stage is left unconditioned, as in the official ``ConvBlockTemb``).
Blocks built with ``time_dim=None`` have no projection and ignore ``temb``; blocks built
with it skip the projection when ``temb`` is ``None`` (the image-only path through the
shared encoder).

Shapes: images ``(B, 1, Z, Y, X)``; logits ``(B, C, Z, Y, X)``; every spatial edge must be
divisible by 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DiffVNet", "VNet", "VNetConfig", "timestep_embedding"]

#: Sinusoidal embedding width and MLP output width (official ``TimeStepEmbedding``).
TIME_EMBED_IN, TIME_EMBED_OUT = 128, 512
#: Dropout after every convolution (official ``ConvBlockOneStage``).
STAGE_DROPOUT = 0.1


@dataclass(frozen=True)
class VNetConfig:
    """VNet shape.

    Attributes:
        width: channels of the first stage; the deepest has 16× (official ``n_filters``: 32
            for every A&D task; 16 is the classic VNet of UA-MT / BCP).
        dropout: the 0.5 dropouts on the deepest features and before the output layer.
        stage_dropout: Dropout3d rate after every convolution (official 0.1). Dropout3d drops
            whole channels: at width 8 a 0.1 rate silences most of a stage's channels in some
            crops, which is why the CPU configs set it (and ``dropout``) off.
        in_channels: image channels.
    """

    width: int = 32
    dropout: bool = True
    stage_dropout: float = STAGE_DROPOUT
    in_channels: int = 1

    def __post_init__(self) -> None:
        if self.width < 1 or self.in_channels < 1:
            raise ValueError(
                f"width and in_channels must be >= 1, got {self.width}, {self.in_channels}"
            )
        if not 0 <= self.stage_dropout < 1:
            raise ValueError(f"stage_dropout must be in [0, 1), got {self.stage_dropout}")

    @property
    def divisor(self) -> int:
        """Every input edge must be a multiple of this (four stride-2 stages)."""
        return 16


def timestep_embedding(t: torch.Tensor, dim: int = TIME_EMBED_IN) -> torch.Tensor:
    """DDPM sinusoidal embedding: ``t (B,)`` integer steps → ``(B, dim)``.

    ``[sin(t·f_0..f_{h-1}), cos(...)]`` with ``f_i = exp(-ln(10000)·i/(h-1))``, ``h = dim/2``.
    """
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000) / (half - 1))
    )
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class _TimeAdd(nn.Module):
    """Adds ``Linear(SiLU(temb))`` per channel (official ``TembFusion``)."""

    def __init__(self, channels: int, time_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(time_dim, channels)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.silu(temb))[:, :, None, None, None]


class _Conv(nn.Module):
    """conv3×3×3 → ReLU → BatchNorm → Dropout3d(0.1) [→ + time projection]."""

    def __init__(
        self, cin: int, cout: int, time_dim: int | None, drop: float = STAGE_DROPOUT
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm3d(cout)
        self.drop = nn.Dropout3d(drop) if drop else nn.Identity()
        self.time = _TimeAdd(cout, time_dim) if time_dim else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        x = self.drop(self.norm(F.relu(self.conv(x))))
        return self.time(x, temb) if self.time is not None and temb is not None else x


class _Stage(nn.Module):
    """``n`` convolutions; all but the last take the time embedding."""

    def __init__(
        self, n: int, cin: int, cout: int, time_dim: int | None, drop: float = STAGE_DROPOUT
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            _Conv(cin if i == 0 else cout, cout, time_dim if i < n - 1 else None, drop)
            for i in range(n)
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x, temb)
        return x


class _Resample(nn.Module):
    """Stride-2 conv (down) or transposed conv (up) → ReLU → BatchNorm [→ + time]."""

    def __init__(self, cin: int, cout: int, up: bool, time_dim: int | None) -> None:
        super().__init__()
        conv = nn.ConvTranspose3d if up else nn.Conv3d
        self.conv = conv(cin, cout, 2, stride=2)
        self.norm = nn.BatchNorm3d(cout)
        self.time = _TimeAdd(cout, time_dim) if time_dim else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        x = self.norm(F.relu(self.conv(x)))
        return self.time(x, temb) if self.time is not None and temb is not None else x


#: Convolutions per encoder stage after stage 1 (VNet: 2, 3, 3, 3) and per decoder stage.
_ENCODER_CONVS = (2, 3, 3, 3)
_DECODER_CONVS = (3, 3, 2, 1)


class Encoder(nn.Module):
    """Stem output ``(B, w, Z, Y, X)`` → five feature maps, deepest ``(B, 16w, Z/16, ...)``."""

    def __init__(
        self, width: int, dropout: bool, time_dim: int | None, drop: float = STAGE_DROPOUT
    ) -> None:
        super().__init__()
        w = [width * 2**i for i in range(5)]
        self.down = nn.ModuleList(_Resample(w[i], w[i + 1], False, time_dim) for i in range(4))
        self.stages = nn.ModuleList(
            _Stage(n, w[i + 1], w[i + 1], time_dim, drop) for i, n in enumerate(_ENCODER_CONVS)
        )
        self.dropout = nn.Dropout3d(0.5) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> list[torch.Tensor]:
        features = [x]
        for down, stage in zip(self.down, self.stages):
            x = stage(down(x, temb), temb)
            features.append(x)
        features[-1] = self.dropout(features[-1])
        return features


class Decoder(nn.Module):
    """Five feature maps → logits ``(B, C, Z, Y, X)``; skips are added."""

    def __init__(
        self,
        width: int,
        n_classes: int,
        dropout: bool,
        time_dim: int | None,
        drop: float = STAGE_DROPOUT,
    ) -> None:
        super().__init__()
        w = [width * 2**i for i in range(5)]
        self.up = nn.ModuleList(_Resample(w[4 - i], w[3 - i], True, time_dim) for i in range(4))
        self.stages = nn.ModuleList(
            _Stage(n, w[3 - i], w[3 - i], time_dim, drop) for i, n in enumerate(_DECODER_CONVS)
        )
        self.dropout = nn.Dropout3d(0.5) if dropout else nn.Identity()
        self.out = nn.Conv3d(width, n_classes, 1)

    def forward(
        self, features: list[torch.Tensor], temb: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = features[-1]
        for i, (up, stage) in enumerate(zip(self.up, self.stages)):
            x = stage(up(x, temb) + features[3 - i], temb)
        return self.out(self.dropout(x))


class VNet(nn.Module):
    """Plain VNet: image stem, encoder, one decoder (the supervised / mean-teacher network).

    ``forward(image (B, 1, Z, Y, X)) -> logits (B, C, Z, Y, X)``.
    """

    def __init__(self, config: VNetConfig, n_classes: int) -> None:
        super().__init__()
        self.config, self.n_classes = config, n_classes
        drop = config.stage_dropout
        self.stem = _Stage(1, config.in_channels, config.width, None, drop)
        self.encoder = Encoder(config.width, config.dropout, None, drop)
        self.decoder = Decoder(config.width, n_classes, config.dropout, None, drop)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(self.stem(image, None)))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """The deepest encoder features ``(B, 16·width, Z/16, Y/16, X/16)`` of ``image (B, 1, Z, Y,
        X)``
        (PatchCL's patch embeddings start from them)."""
        return self.encoder(self.stem(image, None))[-1]


class DiffVNet(nn.Module):
    """A&D's Diff-VNet: one shared (time-aware) encoder, two stems, three decoders.

    * ``denoise(x_t, t, image)``: D_ξ on ``concat(image, x_t)`` with the time embedding
      (``diffusion=False``: D_ξ on the image alone, the "w/o Diffusion" ablation);
    * ``psi(image)``: the difficulty-aware decoder D_ψ;
    * ``forward(image)`` / ``theta``: D_θ, the only decoder used at test time.

    ``diffusion=False`` ("w/o Diffusion"): D_ξ is a plain decoder on its own image stem,
    and nothing is time-conditioned.

    ``x_t`` is the noisy one-hot label in ``[-1, 1]``, ``(B, C, Z, Y, X)``; ``t (B,)`` steps.
    """

    def __init__(self, config: VNetConfig, n_classes: int, diffusion: bool = True) -> None:
        super().__init__()
        self.config, self.n_classes, self.diffusion = config, n_classes, diffusion
        w, drop, p = config.width, config.dropout, config.stage_dropout
        # Without diffusion nothing is time-conditioned: no unused parameters (DDP needs that).
        time_dim = TIME_EMBED_OUT if diffusion else None
        self.time_mlp = (
            nn.Sequential(
                nn.Linear(TIME_EMBED_IN, TIME_EMBED_OUT),
                nn.SiLU(),
                nn.Linear(TIME_EMBED_OUT, TIME_EMBED_OUT),
            )
            if diffusion
            else None
        )
        noisy_in = config.in_channels + (n_classes if diffusion else 0)
        self.noisy_stem = _Stage(1, noisy_in, w, None, p)
        self.image_stem = _Stage(1, config.in_channels, w, None, p)
        self.encoder = Encoder(w, drop, time_dim, p)
        self.decoder_xi = Decoder(w, n_classes, drop, time_dim, p)
        self.decoder_psi = Decoder(w, n_classes, drop, None, p)
        self.decoder_theta = Decoder(w, n_classes, drop, None, p)

    def denoise(
        self, x_t: torch.Tensor | None, t: torch.Tensor | None, image: torch.Tensor
    ) -> torch.Tensor:
        """D_ξ: x̂0 logits from the noisy label ``x_t`` at step ``t`` given ``image``."""
        if self.time_mlp is None:
            return self.decoder_xi(self.encoder(self.noisy_stem(image, None)))
        if x_t is None or t is None:
            raise ValueError("the diffusion branch needs x_t and t")
        temb = self.time_mlp(timestep_embedding(t))
        features = self.encoder(self.noisy_stem(torch.cat([image, x_t], dim=1), None), temb)
        return self.decoder_xi(features, temb)

    def image_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The shared encoder on the image-only stem (no time conditioning)."""
        return self.encoder(self.image_stem(image, None))

    def psi(self, image: torch.Tensor) -> torch.Tensor:
        return self.decoder_psi(self.image_features(image))

    def theta(self, image: torch.Tensor) -> torch.Tensor:
        return self.decoder_theta(self.image_features(image))

    def forward(
        self,
        image: torch.Tensor,
        x_t: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        unlabeled: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``forward(image)``: D_θ logits (inference, export). With ``unlabeled``: one training
        pass ``(D_ξ(x_t, t, image), D_ψ(image), D_θ(unlabeled))``, so DDP sees one forward."""
        if unlabeled is None:
            return self.theta(image)
        return self.denoise(x_t, t, image), self.psi(image), self.theta(unlabeled)

    @torch.no_grad()
    def average_into_theta(self, momentum: float) -> None:
        """θ ← m·θ + (1 − m)·(ξ + ψ)/2 over parameters with the same name and shape.

        Official ``train_diffusion.py``: done before every forward pass with m = 0.99. D_ξ's
        time projections have no counterpart in D_θ and are skipped; BatchNorm running
        statistics are buffers, not parameters, and stay D_θ's own.
        """
        xi = dict(self.decoder_xi.named_parameters())
        psi = dict(self.decoder_psi.named_parameters())
        for name, param in self.decoder_theta.named_parameters():
            a, b = xi.get(name), psi[name]
            if a is not None and a.shape == param.shape:
                param.mul_(momentum).add_((a + b) / 2, alpha=1 - momentum)
