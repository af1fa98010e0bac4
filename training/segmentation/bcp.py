"""Bidirectional Copy-Paste (BCP; Bai et al., CVPR 2023): masks, mixes, losses, pseudo-labels
and the two training phases.

Written from the paper and the official code (DeepMed-Lab-ECNU/BCP): ``code/LA_BCP_train.py``
(``pre_train``, ``self_train``, ``get_cut_mask``, ``LargestCC_pancreas``),
``code/LA&ACDC/utils/BCP_utils.py`` (``context_mask``, ``mix_loss``) and
``code/LA&ACDC/utils/losses.py`` (``mask_DiceLoss``).

Shapes: images ``(B, 1, *spatial)``, labels ``(B, *spatial)`` integer classes, logits
``(B, C, *spatial)``, with ``spatial = (Z, Y, X)``. A copy-paste mask ``M`` is a bool
``spatial`` tensor, True outside the pasted box and False inside it (the official ``img_mask``:
1 outside, 0 inside); ``copy_paste(a, b, M) = a·M + b·(1 − M)``.

Random parameters are drawn apart from applying them (TorchIO style): :func:`sample_box`
draws a :class:`Box` from a ``torch.Generator``, :func:`box_mask` is a pure function of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medssl.pipeline.segment import largest_component
from medssl.training.segmentation.config import BCPConfig
from medssl.training.segmentation.losses import as_label_map

__all__ = [
    "BCPPhases",
    "Box",
    "bidirectional_mix",
    "box_mask",
    "copy_paste",
    "keep_largest_components",
    "masked_cross_entropy",
    "masked_dice_loss",
    "mix_loss",
    "pseudo_labels",
    "sample_box",
]

#: ``mask_DiceLoss(nclass=2)``'s default smoothing.
DICE_SMOOTH = 1e-5


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in a patch: ``corner`` and ``size`` per spatial axis, in voxels."""

    corner: tuple[int, ...]
    size: tuple[int, ...]

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(c, c + s) for c, s in zip(self.corner, self.size))


def sample_box(
    patch: Sequence[int],
    ratio: float,
    generator: torch.Generator | None = None,
    *,
    whole_depth: bool = False,
) -> Box:
    """Draw the zeroed box of one iteration (official ``context_mask``).

    Each edge is ``int(edge * ratio)``; the corner is uniform over every position where the box
    fits in the patch, ``0..edge − size`` (the official ``np.random.randint(0, edge − size)``
    leaves out the last position, by its exclusive upper bound).

    Args:
        patch: the spatial shape ``(Z, Y, X)`` (any number of axes).
        ratio: box edge / patch edge, in ``(0, 1)`` (official 2/3).
        generator: the random stream; the global one when None.
        whole_depth: the box spans axis 0 entirely, as 2D BCP does on each slice
            (``ACDC_BCP_train.py`` ``generate_mask``), for slice-wise 2D networks.

    Raises:
        ValueError: ``ratio`` outside ``(0, 1)`` or a patch edge too small for a box of >= 1 voxel.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    patch = tuple(int(p) for p in patch)
    size = tuple(p if whole_depth and axis == 0 else int(p * ratio) for axis, p in enumerate(patch))
    if min(size) < 1:
        raise ValueError(f"patch {patch} is too small for a box of ratio {ratio} (box {size})")
    corner = tuple(
        int(torch.randint(0, p - s + 1, (1,), generator=generator)) for p, s in zip(patch, size)
    )
    return Box(corner, size)


def box_mask(
    patch: Sequence[int], box: Box, device: torch.device | str | None = None
) -> torch.Tensor:
    """The copy-paste mask ``M``: bool ``patch``, True everywhere but in ``box`` (False)."""
    mask = torch.ones(tuple(int(p) for p in patch), dtype=torch.bool, device=device)
    mask[box.slices()] = False
    return mask


def copy_paste(outside: torch.Tensor, inside: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``outside`` where ``mask`` is True, ``inside`` in the box: ``outside·M + inside·(1 − M)``.

    Works for images ``(B, 1, *spatial)`` and labels ``(B, *spatial)`` alike (``mask`` is
    ``spatial`` and broadcasts); values are copied exactly, whatever the dtype.
    """
    if outside.shape != inside.shape:
        raise ValueError(f"cannot copy-paste {tuple(inside.shape)} into {tuple(outside.shape)}")
    return torch.where(mask, outside, inside)


def bidirectional_mix(
    labeled_a: torch.Tensor,
    labeled_b: torch.Tensor,
    unlabeled_a: torch.Tensor,
    unlabeled_b: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCP's two mixes with one mask (official ``self_train``: ``mixl_img`` / ``mixu_img``).

    ``in = labeled_a·M + unlabeled_a·(1 − M)`` (labeled outside, unlabeled pasted in) and
    ``out = unlabeled_b·M + labeled_b·(1 − M)`` (unlabeled outside, labeled pasted in). Used
    for the images and, with ground truth and pseudo-labels, for the targets.
    """
    return copy_paste(labeled_a, unlabeled_a, mask), copy_paste(unlabeled_b, labeled_b, mask)


def _region(region: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    """Voxel weights ``(B, *spatial)`` float32 from a ``spatial`` / ``(B, *spatial)`` region."""
    if region is None:
        return torch.ones(target.shape, dtype=torch.float32, device=target.device)
    return region.to(device=target.device, dtype=torch.float32).expand(target.shape)


def masked_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    region: torch.Tensor | None = None,
    smooth: float = DICE_SMOOTH,
) -> torch.Tensor:
    """``mask_DiceLoss`` (official ``losses.py``): soft Dice per sample and class, background
    included, over the voxels of ``region``, then ``1 − mean`` over samples × classes::

        dice[n, c] = (2·Σ_v m_v·p·t + s) / (Σ_v m_v·(p + t) + s)      p = softmax, t = one-hot

    Args:
        logits: ``(B, C, *spatial)``.
        target: ``(B, *spatial)`` integer classes in ``[0, C)``.
        region: bool or 0/1 ``spatial`` or ``(B, *spatial)``; None: every voxel.
        smooth: ``s`` (official 1e-5).

    Returns:
        Scalar float32 loss.
    """
    target = as_label_map(logits, target)
    probs = logits.float().softmax(dim=1)
    onehot = torch.zeros_like(probs).scatter_(1, target.unsqueeze(1), 1.0)
    weight = _region(region, target).unsqueeze(1)
    axes = tuple(range(2, probs.ndim))
    inter = (probs * onehot * weight).sum(axes)
    union = ((probs + onehot) * weight).sum(axes)
    return 1.0 - ((2 * inter + smooth) / (union + smooth)).mean()


def masked_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over the voxels of ``region`` in the whole batch (official
    ``(CE(out, t) * mask).sum() / (mask.sum() + 1e-16)``). Shapes as :func:`masked_dice_loss`."""
    target = as_label_map(logits, target)
    weight = _region(region, target)
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * weight).sum() / (weight.sum() + 1e-16)


def mix_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    outside_weight: float,
    inside_weight: float,
    valid: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The loss of one mix (official ``mix_loss``): masked Dice + masked CE on the two sources.

    ``dice = w_out·Dice(M) + w_in·Dice(1 − M)``, ``ce = w_out·CE(M) + w_in·CE(1 − M)``,
    ``loss = (dice + ce) / 2``. Ground truth weighs 1 and pseudo-labels α: the in-mix (labeled
    outside) takes ``(1, α)``, the out-mix (labeled inside) ``(α, 1)``. The official passes
    the two unmixed targets; on each region they equal the mixed ``target`` used here.

    Args:
        logits: ``(B, C, *spatial)``.
        target: ``(B, *spatial)``, the copy-pasted target of this mix.
        mask: bool ``spatial``, True outside the box.
        valid: bool ``(B, *spatial)``, the voxels to train on (a pseudo-label filter's keep mask,
            mixed like the targets, True on ground truth); None: every voxel (official).

    Returns:
        ``loss``, ``dice`` and ``ce`` scalars.
    """
    outside, inside = mask, ~mask
    if valid is not None:
        outside, inside = outside & valid, inside & valid
    dice = outside_weight * masked_dice_loss(
        logits, target, outside
    ) + inside_weight * masked_dice_loss(logits, target, inside)
    ce = outside_weight * masked_cross_entropy(
        logits, target, outside
    ) + inside_weight * masked_cross_entropy(logits, target, inside)
    return {"loss": (dice + ce) / 2, "dice": dice, "ce": ce}


def keep_largest_components(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per sample, keep the largest 26-connected component of each class ``1..C−1``; voxels of
    smaller components become background (official ``LargestCC_pancreas`` for two classes; for
    more classes the largest component of each class, as ``get_ACDC_2DLargestCC``). Classes
    absent from a sample are left alone. ``(B, *spatial)`` → same, on the same device.

    Uses the pipeline's :func:`medssl.pipeline.segment.largest_component` (test-time
    post-processing), on the CPU. On a crop one slice deep, 26-connected is 8-connected
    in-plane, as the official 2D (ACDC) code.
    """
    keep = range(1, n_classes)
    out = [largest_component(sample, keep) for sample in labels.cpu().numpy()]
    return torch.from_numpy(np.stack(out)).to(labels.device)


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor, threshold: float, largest_cc: bool) -> torch.Tensor:
    """The teacher's hard pseudo-labels ``(B, C, *spatial)`` → ``(B, *spatial)`` int64.

    Two classes: foreground where ``softmax[:, 1] ≥ threshold`` (official ``get_cut_mask``);
    more classes: the argmax. Then, with ``largest_cc``, :func:`keep_largest_components`.
    """
    probs = logits.float().softmax(dim=1)
    n_classes = probs.shape[1]
    labels = (probs[:, 1] >= threshold).long() if n_classes == 2 else probs.argmax(dim=1)
    return keep_largest_components(labels, n_classes) if largest_cc else labels


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class BCPPhases:
    """The two phases of a BCP run over global steps ``0..optim.steps − 1``.

    Steps ``[0, P)`` pre-train (``P = bcp.pretrain_steps``) at a constant lr; at step ``P`` the
    student and the EMA teacher both load the best pre-trained weights (by validation Dice on
    held-out labeled-pool cases; the latest pre-trained weights without validation cases) and
    the SGD state is reset (official ``self_train`` builds a fresh optimiser and
    ``load_net``s the pre-trained ``best_model.pth`` into both networks); steps ``[P, end)``
    self-train with the lr ×``lr_gamma`` every ``lr_step`` steps (official ``iter_num % 2500``).

    The best pre-trained weights travel in every checkpoint until step ``P``
    (:meth:`state_dict`), so a run interrupted in either phase resumes exactly.
    """

    def __init__(self, cfg: BCPConfig) -> None:
        self.cfg = cfg
        self.best_step: int | None = None
        self.best_dice: float | None = None
        self.best_model: dict[str, torch.Tensor] | None = None

    @property
    def pretrain_steps(self) -> int:
        return self.cfg.pretrain_steps

    def pretraining(self, step: int) -> bool:
        """Whether 0-based ``step`` is a pre-training step."""
        return step < self.cfg.pretrain_steps

    def lr_factor(self, step: int) -> float:
        """lr / ``bcp.lr`` for the step after ``step`` completed ones (a ``LambdaLR`` lambda)."""
        if step < self.cfg.pretrain_steps:
            return 1.0
        return self.cfg.lr_gamma ** ((step - self.cfg.pretrain_steps) // self.cfg.lr_step)

    def observe_pretrained(self, step: int, model: nn.Module, dice: float | None) -> None:
        """Keep ``model``'s weights after ``step`` steps when ``dice`` beats the best so far
        (first best wins, as the official ``dice_sample > best_dice``); ``dice=None`` (no
        validation cases) keeps the latest."""
        if dice is None or self.best_dice is None or dice > self.best_dice:
            self.best_step, self.best_dice, self.best_model = step, dice, _state_copy(model)

    def start_self_training(
        self, student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        """Load the best pre-trained weights into ``student`` and ``teacher`` and clear the SGD
        momentum. Under DDP rank 0's choice is broadcast (only rank 0 validates)."""
        if self.best_model is None:
            raise RuntimeError(
                "no pre-trained weights recorded: observe_pretrained() must run at step "
                f"{self.pretrain_steps}"
            )
        student.load_state_dict(self.best_model)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for tensor in student.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        teacher.load_state_dict(student.state_dict())
        optimizer.state.clear()
        self.best_model = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_step": self.best_step,
            "best_dice": self.best_dice,
            "best_model": self.best_model,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_step, self.best_dice, self.best_model = (
            state["best_step"],
            state["best_dice"],
            state["best_model"],
        )
