"""Detection losses: the soft-target focal loss of FocalMix and smooth L1 box regression.

Per-anchor tensors are ``(B, N)`` (``N`` anchors in :class:`medssl.detection.AnchorGrid`
order); regression tensors are ``(B, N, 4)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["FocalConfig", "detection_loss", "positive_count", "soft_focal_loss"]


@dataclass(frozen=True)
class FocalConfig:
    """Focal-loss parameters (paper §4.1: α0 = 0.05, α1 = 0.95, γ = 2).

    Attributes:
        alpha0, alpha1: class weights of negatives and positives.
        gamma: focusing exponent.
        soft_alpha: α(y) = α0 + y(α1 − α0) (eq. 9); False: the paper's ablation
            "pseudo-hard targets" for α, α(y) = α1 if y > 0.5 else α0 (Table 3a).
        soft_beta: β(y, p) = |y − p|^γ (eq. 9); False: β from the hard target 1[y > 0.5].
        smooth_l1_beta: transition point of the smooth L1 box loss (Detectron's 1/9).
        box_weight: weight of the box loss against the objectness loss.
    """

    alpha0: float = 0.05
    alpha1: float = 0.95
    gamma: float = 2.0
    soft_alpha: bool = True
    soft_beta: bool = True
    smooth_l1_beta: float = 1.0 / 9.0
    box_weight: float = 1.0

    def __post_init__(self) -> None:
        if not (0 <= self.alpha0 <= 1 and 0 <= self.alpha1 <= 1):
            raise ValueError(
                f"alpha0 and alpha1 must be in [0, 1], got {self.alpha0}, {self.alpha1}"
            )
        if self.gamma < 0 or self.smooth_l1_beta < 0 or self.box_weight < 0:
            raise ValueError("gamma, smooth_l1_beta and box_weight must be non-negative")


def soft_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, config: FocalConfig = FocalConfig()
) -> torch.Tensor:
    """Soft-target focal loss, element-wise (FocalMix eq. 9).

    ``SFL(p) = [α0 + y(α1 − α0)] · |y − p|^γ · CE(y, p)`` with ``p = sigmoid(logit)``;
    for ``y ∈ {0, 1}`` it is the focal loss of Lin et al. (eq. 1).

    Args:
        logits: objectness logits, any shape.
        targets: soft targets ``y ∈ [0, 1]``, same shape.

    Returns:
        The loss per element (no reduction, no masking).
    """
    p = torch.sigmoid(logits)
    hard = (targets > 0.5).to(targets.dtype)
    y_alpha = targets if config.soft_alpha else hard
    y_beta = targets if config.soft_beta else hard
    alpha = config.alpha0 + y_alpha * (config.alpha1 - config.alpha0)
    beta = (y_beta - p).abs().pow(config.gamma)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return alpha * beta * ce


def positive_count(*targets: torch.Tensor) -> torch.Tensor:
    """RetinaNet's focal-loss normaliser: ``max(1, #anchors with target >= 0.5)`` over all of
    ``targets`` (each ``(B, N)``, -1 = ignored), a float scalar tensor."""
    if not targets:
        raise ValueError("positive_count needs at least one target tensor")
    return torch.stack([(t >= 0.5).sum() for t in targets]).sum().clamp(min=1).float()


def detection_loss(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    deltas: torch.Tensor,
    box_mask: torch.Tensor,
    config: FocalConfig = FocalConfig(),
    *,
    normaliser: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Objectness + box loss of a batch, normalised by its number of positive anchors.

    Args:
        outputs: ``(B, N, 5)`` network outputs (logit, dz, dy, dx, dd).
        targets: ``(B, N)`` objectness targets in [0, 1]; -1 marks ignored anchors.
        deltas: ``(B, N, 4)`` regression targets.
        box_mask: ``(B, N)`` bool, anchors with a box target.
        config: loss parameters.
        normaliser: the count the objectness sum is divided by; default this batch's
            :func:`positive_count`. A batch scored in parts (FocalMix's labeled and unlabeled
            halves) passes the whole batch's count, so every part has the same scale.

    Returns:
        ``{"cls", "box", "loss"}`` scalars. Normalisation (RetinaNet): the sum over anchors
        is divided by ``max(1, #anchors with target >= 0.5)``, so a soft or mixed batch
        is normalised like a hard one with the same dominant objects. The box loss is
        divided by the number of anchors in ``box_mask``.
    """
    valid = targets >= 0
    y = targets.clamp(min=0)
    cls = (soft_focal_loss(outputs[..., 0], y, config) * valid).sum()
    n_pos = positive_count(targets) if normaliser is None else normaliser
    if box_mask.any():
        box = (
            F.smooth_l1_loss(
                outputs[..., 1:][box_mask],
                deltas[box_mask],
                beta=config.smooth_l1_beta,
                reduction="sum",
            )
            / box_mask.sum().clamp(min=1)
            / 4
        )
    else:
        box = outputs[..., 1:].sum() * 0.0
    cls = cls / n_pos
    return {"cls": cls, "box": box, "loss": cls + config.box_weight * box}
