"""The label diffusion of A&D: forward noising and DDIM sampling of x0-predicting models.

Official ``code/DiffVNet/diff_vnet.py`` with ``guided_diffusion``: T = 1000 steps, a
linear β schedule from 1e-4 to 0.02, ``ModelMeanType.START_X`` (the network predicts x0),
timesteps drawn uniformly for training, and pseudo-labels sampled with a 10-step DDIM
(η = 0, ``space_timesteps(1000, [10])`` → steps 0, 111, ..., 999), each x̂0 clamped to
``[-1, 1]``; the sample is the last x̂0.

Labels live in ``[-1, 1]``: ``x0 = one_hot(y)·2 − 1``, shape ``(B, C, Z, Y, X)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["LabelDiffusion", "label_to_x0", "spaced_steps"]


def label_to_x0(label: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Label map ``(B, Z, Y, X)`` long → ``one_hot·2 − 1`` float ``(B, C, Z, Y, X)``."""
    return F.one_hot(label.long(), n_classes).permute(0, 4, 1, 2, 3).float() * 2 - 1


def spaced_steps(total: int, count: int) -> list[int]:
    """``guided_diffusion.respace.space_timesteps(total, [count])``: evenly spaced steps
    from 0 to ``total − 1`` (rounded), ascending."""
    if not 1 <= count <= total:
        raise ValueError(f"need 1 <= count <= total, got count={count}, total={total}")
    if count == 1:
        return [0]
    stride = (total - 1) / (count - 1)
    steps, cur = [], 0.0
    for _ in range(count):  # accumulated as respace does, so .5 ties round the same way
        steps.append(round(cur))
        cur += stride
    return steps


@dataclass(frozen=True)
class LabelDiffusion:
    """Linear-β Gaussian diffusion over one-hot labels.

    Attributes:
        steps: T.
        beta_start, beta_end: the linear schedule (DDPM's 1e-4 → 0.02, scaled by 1000/T
            as ``get_named_beta_schedule("linear", T)`` does).
        sample_steps: DDIM steps used to sample pseudo-labels.
    """

    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sample_steps: int = 10

    def __post_init__(self) -> None:
        if self.steps < 2 or not 1 <= self.sample_steps <= self.steps:
            raise ValueError(
                f"need steps >= 2 and 1 <= sample_steps <= steps, got {self.steps}, "
                f"{self.sample_steps}"
            )
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )

    def alphas_cumprod(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """ᾱ_t for t = 0..T−1, float64 ``(T,)``."""
        scale = 1000 / self.steps
        betas = torch.linspace(
            scale * self.beta_start, scale * self.beta_end, self.steps, dtype=torch.float64
        )
        return torch.cumprod(1 - betas, 0).to(device)

    def sample_t(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Uniform training steps ``(B,)`` in ``[0, T)`` (``UniformSampler``)."""
        return torch.randint(0, self.steps, (batch,), generator=generator).to(device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε."""
        abar = self.alphas_cumprod(x0.device)[t].float().view(-1, *([1] * (x0.ndim - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    @torch.no_grad()
    def ddim_x0(
        self,
        predict_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: tuple[int, ...],
        device: torch.device | str,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Deterministic DDIM (η = 0) from x_T ~ N(0, I); returns the last clamped x̂0.

        Args:
            predict_x0: ``(x_t, t) -> x̂0`` in label space (logits are fine: they are
                clamped to ``[-1, 1]`` as ``clip_denoised=True`` does).
            shape: ``(B, C, Z, Y, X)``.
        """
        abar = self.alphas_cumprod(device)
        steps = spaced_steps(self.steps, self.sample_steps)
        x = torch.randn(shape, generator=generator).to(device)
        x0 = x
        for i in reversed(range(len(steps))):
            t = steps[i]
            x0 = (
                predict_x0(x, torch.full((shape[0],), t, device=device, dtype=torch.long))
                .float()
                .clamp(-1, 1)
            )
            a_t = abar[t].float()
            a_prev = abar[steps[i - 1]].float() if i > 0 else torch.ones((), device=device)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x0
