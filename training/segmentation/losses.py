"""Dice + cross-entropy segmentation loss of A&D (L_DiceCE; Wang & Li, NeurIPS 2023, §3.2-3.3).

Follows ``DC_and_CE_loss`` of the official ``code/utils/loss.py`` as ``train_diffusion.py``
builds it (``make_loss_function('w_ce+dice', weight)`` → ``DC_and_CE_loss(w_dc=weight,
w_ce=weight)``, aggregate "sum", ``weight_ce = weight_dice = 1``) with its ``SoftDiceLoss``
(softmax, batch Dice, ``do_bg=False``, smooth 1) and ``RobustCrossEntropyLoss``::

    CE   = cross_entropy(logits, target, weight=w)        # torch mean: Σ w_y·ℓ / Σ w_y
    dc_k = (2·TP_k + 1) / (2·TP_k + FP_k + FN_k + 1 + 1e-8)   k = 1..C−1, soft TP/FP/FN
    loss = CE + 1 − mean_k(w_k · dc_k)                    # w_k = 1 when no weights

Choice: the official returns ``−mean(w·dc)``; we add 1 so that an unweighted loss is >= 0. The
difference is a constant: gradients and the optimum are identical. With DRS weights (which
can exceed 1) the Dice term may still be negative.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

__all__ = [
    "as_label_map",
    "dice_ce_loss",
    "frequency_weights",
    "soft_dice",
    "supervised_loss",
    "unlabeled_ce",
]


def as_label_map(
    logits: torch.Tensor, target: torch.Tensor, *, check_range: bool = False
) -> torch.Tensor:
    """Validate ``target`` against ``logits`` and return it as ``(B, *spatial)`` long.

    Args:
        logits: ``(B, C, *spatial)``.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer labels.
        check_range: also check that labels lie in ``[0, C)`` (one host sync on a GPU).

    Returns:
        The labels on the logits' device.
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
    if target.ndim == logits.ndim:
        if target.shape[1] != 1:
            raise ValueError(f"target must be (B, 1, *spatial), got shape {tuple(target.shape)}")
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer labels, got dtype {target.dtype}")
    c = logits.shape[1]
    if check_range and target.numel():
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= c:
            raise ValueError(f"target labels must be in [0, {c}), got values in [{lo}, {hi}]")
    return target.to(device=logits.device, dtype=torch.long)


def soft_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft batch Dice per class of ``softmax(logits)`` against one-hot ``target``.

    Args:
        logits: ``(B, C, *spatial)``.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer labels in ``[0, C)``.
        smooth: added to numerator and denominator (official ``SoftDiceLoss`` smooth=1; the
            official also adds 1e-8 to the denominator, kept here).

    Returns:
        ``(C,)`` float32 Dice per class (background included), summed over batch and space.
    """
    target = as_label_map(logits, target)
    probs = logits.float().softmax(dim=1)
    onehot = torch.zeros_like(probs).scatter_(1, target.unsqueeze(1), 1.0)
    axes = [0, *range(2, probs.ndim)]
    tp = (probs * onehot).sum(axes)
    fp = probs.sum(axes) - tp
    fn = onehot.sum(axes) - tp
    return (2 * tp + smooth) / (2 * tp + fp + fn + smooth + 1e-8)


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    ce_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """A&D's L_DiceCE: weighted CE + (1 − weighted soft foreground Dice).

    Args:
        logits: ``(B, C, Z, Y, X)`` raw scores (any number of spatial axes works).
        target: ``(B, Z, Y, X)`` or ``(B, 1, Z, Y, X)`` integer labels in ``[0, C)``.
        class_weights: ``(C,)`` weights for both terms (DRS weights), or None for all ones.
            CE uses them as torch's ``weight`` (mean divided by the summed weights of the
            targets); Dice multiplies the foreground Dice ``dc[1:]`` by ``w[1:]``.
        ce_weights: ``(C,)`` weights for the CE term only (the frequency weighting of
            ``loss.class_weighting``); ``class_weights`` wins where both are given.

    Returns:
        Scalar float32 loss.
    """
    target = as_label_map(logits, target)
    c = logits.shape[1]
    for name, w in (("class_weights", class_weights), ("ce_weights", ce_weights)):
        if w is not None and w.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},), got {tuple(w.shape)}")
    if class_weights is not None:
        class_weights = class_weights.detach().to(device=logits.device, dtype=torch.float32)
    ce_weight = (
        class_weights
        if class_weights is not None
        else (
            None
            if ce_weights is None
            else ce_weights.detach().to(device=logits.device, dtype=torch.float32)
        )
    )
    logits = logits.float()
    ce = F.cross_entropy(logits, target, weight=ce_weight)
    dice = soft_dice(logits, target)[1:]
    if class_weights is not None:
        dice = dice * class_weights[1:]
    return ce + (1.0 - dice.mean())


def frequency_weights(counts: torch.Tensor | Sequence[int], power: float = 0.25) -> torch.Tensor:
    """Cross-entropy class weights from voxel counts: ``w_k = (n_0 / n_k) ** power``, background
    (class 0) weighing 1; a class with no voxel gets the largest weight of the others.

    Inverse-frequency weighting (power 1) would weigh an adrenal gland 10^4 times the background
    on the abdominal phantom; the fourth root (10x) is what let the width-8 VNet learn it at all
    on a CPU budget (issue 19: the adrenals stayed at 0 Dice after 4000 steps unweighted, 0.85
    after 1500 weighted), while the large organs keep weights of 2-4.

    Args:
        counts: ``(C,)`` voxel count per class, background first.
        power: the damping exponent.

    Returns:
        ``(C,)`` float32 weights.
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    if n.ndim != 1 or len(n) < 2 or n[0] <= 0 or (n < 0).any():
        raise ValueError(
            f"counts must be (C >= 2,) non-negative with background voxels, got {n.tolist()}"
        )
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    present = n > 0
    w = torch.ones_like(n)
    w[present] = (n[0] / n[present]) ** power
    if not present.all():
        w[~present] = w[present].max()
    return w.float()


def supervised_loss(logits: torch.Tensor, labeled: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every method's loss on labeled crops: Dice + CE against ``labeled["label"]``, the CE
    weighted by ``labeled["ce_weights"]`` when the trainer adds them (``loss.class_weighting``)."""
    return dice_ce_loss(logits, labeled["label"], ce_weights=labeled.get("ce_weights"))


def unlabeled_ce(logits: torch.Tensor, pseudo: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """FixMatch's unlabeled term for segmentation: cross-entropy of the strong view's ``logits
    (B, C, *S)`` against ``pseudo (B, *S)``, averaged over the kept voxels ``keep (B, *S)`` only;
    0 (still attached to the graph) when none is kept. (FixMatch averages over the whole batch
    with the mask as a weight; over voxels of a 3D crop that would let the kept fraction,
    mostly background early on, scale the term, so the mean is over kept voxels.)"""
    ce = F.cross_entropy(logits.float(), pseudo, reduction="none")
    kept = keep.to(ce.dtype)
    return (ce * kept).sum() / kept.sum().clamp_min(1.0)
