"""``ad``: A&D (Diff-VNet, label diffusion, DRS, RS; config section ``ad``,
:class:`~medssl.training.segmentation.config.ADConfig`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from medssl.training.methods.base import Batch, SegmentationMethod
from medssl.training.methods.common import rampup
from medssl.training.networks.diffusion import LabelDiffusion, label_to_x0
from medssl.training.networks.vnet import DiffVNet
from medssl.training.segmentation.config import SegmentationExperiment
from medssl.training.segmentation.drs import DifficultyWeights
from medssl.training.segmentation.losses import dice_ce_loss, supervised_loss

__all__ = ["AD", "ad_step", "gaussian_smooth"]


def gaussian_smooth(probabilities: torch.Tensor, sigma: float = 1.0, size: int = 3) -> torch.Tensor:
    """Per-channel ``size³`` Gaussian (normalised to sum 1), ``padding="same"`` with zeros
    (official ``GaussianSmoothing(num_cls, 3, 1)``). ``(B, C, Z, Y, X)`` → same shape."""
    r = torch.arange(size, dtype=torch.float32, device=probabilities.device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    kernel = g[:, None, None] * g[None, :, None] * g[None, None, :]
    kernel = (kernel / kernel.sum()).to(probabilities.dtype)
    c = probabilities.shape[1]
    weight = kernel.expand(c, 1, size, size, size).contiguous()
    return F.conv3d(probabilities, weight, padding=size // 2, groups=c)


def _gumbel_softmax(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``F.gumbel_softmax(logits, tau=1, dim=1)`` (soft), with the noise drawn from ``generator``
    so the step's random stream stays in one place: softmax(logits − log(−log U)), U ~ U(0, 1)."""
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-20, 1.0).to(logits.device)
    return torch.softmax(logits - torch.log(-torch.log(u)), dim=1)


@torch.no_grad()
def _pseudo_label(
    raw: DiffVNet,
    image: torch.Tensor,
    diffusion: LabelDiffusion,
    rs: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """ŷ = argmax(p_ξ + p_ψ) on unlabeled crops ``(B, 1, Z, Y, X)`` → ``(B, Z, Y, X)``.

    p_ξ: the 10-step DDIM x̂0 (or D_ξ's logits without diffusion), then with RS
    GaussianSmooth(GumbelSoftmax_τ=1(·)), without RS softmax(·); p_ψ = softmax(D_ψ).
    Official ``train_diffusion.py`` (``ddim_sample``, ``gumbel_softmax``, ``GaussianSmoothing``).
    """
    if raw.time_mlp is not None:
        shape = (image.shape[0], raw.n_classes, *image.shape[2:])
        xi = diffusion.ddim_x0(
            lambda x_t, t: raw.denoise(x_t, t, image), shape, image.device, generator
        )
    else:
        xi = raw.denoise(None, None, image)
    xi = xi.float()
    p_xi = gaussian_smooth(_gumbel_softmax(xi, generator)) if rs else torch.softmax(xi, dim=1)
    p_psi = torch.softmax(raw.psi(image).float(), dim=1)
    return torch.argmax(p_xi + p_psi, dim=1)


def ad_step(
    model: nn.Module,
    raw: DiffVNet,
    labeled: dict[str, torch.Tensor],
    unlabeled: dict[str, torch.Tensor],
    drs: DifficultyWeights | None,
    step: int,
    cfg: SegmentationExperiment,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One A&D step (official ``train_diffusion.py``):

    1. θ ← 0.99·θ + 0.01·(ξ + ψ)/2;
    2. L_deno = DiceCE(D_ξ(x_l, x_t, t), y) with x_t = q_sample(one_hot(y)·2 − 1, t);
    3. L_diff = DiceCE(D_ψ(x_l), y) weighted per class by DRS (from D_ξ's hard Dice);
    4. ŷ = argmax(p_ξ + p_ψ) on x_u (no grad), L_u = DiceCE(D_θ(x_u), ŷ);
    5. L = L_deno + L_diff + μ·L_u, μ = w_u·exp(−5(1 − e/E)²).

    Args:
        model: the (possibly DDP-wrapped) :class:`DiffVNet`; ``raw`` is the same unwrapped.
        drs: the re-weighting state, or ``None`` for uniform weights ("w/o DRS").
    """
    ad = cfg.ad
    raw.average_into_theta(ad.ema)
    x, y, u = labeled["image"], labeled["label"], unlabeled["image"]
    x_t = t = None
    if raw.time_mlp is not None:
        diffusion = ad.diffusion_process
        t = diffusion.sample_t(x.shape[0], generator, x.device)
        noise = torch.randn((*x.shape[:1], raw.n_classes, *x.shape[2:]), generator=generator).to(
            x.device
        )
        x_t = diffusion.q_sample(label_to_x0(y, raw.n_classes), t, noise)
    pseudo = _pseudo_label(raw, u, ad.diffusion_process, ad.rs, generator)
    p_xi, p_psi, p_theta = model(x, x_t=x_t, t=t, unlabeled=u)
    deno = supervised_loss(p_xi.float(), labeled)
    weights = drs.update(p_xi.detach().float(), y) if drs is not None else None
    diff = dice_ce_loss(p_psi.float(), y, weights)
    unsup = dice_ce_loss(p_theta.float(), pseudo)
    mu = ad.mu * rampup(step, cfg.optim.steps, ad.rampup_fraction)
    out = {
        "loss": deno + diff + mu * unsup,
        "deno": deno,
        "diff": diff,
        "unsup": unsup,
        "mu": torch.tensor(mu),
    }
    if weights is not None:
        out.update({f"drs/{c}": w for c, w in enumerate(weights.detach().cpu())})
    return out


class AD(SegmentationMethod):
    """A&D: the Diff-VNet and, with ``ad.drs``, the DRS state (checkpoint ``method.drs``)."""

    def build(self, device: torch.device) -> None:
        super().build(device)
        ad = self.cfg.ad
        self.drs = (
            DifficultyWeights(self.data.n_classes, momentum=ad.drs_momentum) if ad.drs else None
        )

    def state_dict(self) -> dict[str, Any]:
        return {} if self.drs is None else {"drs": self.drs.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.drs is not None:
            self.drs.load_state_dict(state["drs"])

    def step(self, step: int, batch: Batch) -> dict[str, torch.Tensor]:
        raw = self.network
        assert isinstance(raw, DiffVNet)
        return ad_step(
            self.model,
            raw,
            batch.labeled,
            batch.unlabeled(),
            self.drs,
            step,
            self.cfg,
            batch.generator,
        )
