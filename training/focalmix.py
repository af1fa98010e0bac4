"""FocalMix's semi-supervised pieces (Wang et al., CVPR 2020, §3).

* :func:`guess_targets`: anchor-level target prediction (§3.2) — average the anchor
  probabilities predicted on K flipped/rotated copies of an unlabeled patch, each mapped
  back through the exact inverse, then sharpen anchor-wise (MixMatch eq. 4, two classes).
* :func:`image_mixup` (§3.3, eq. 10-13): mix images and anchor targets with
  ``λ̃ = max(λ, 1 − λ)``, ``λ ~ Beta(η, η)``.
* :func:`object_mixup` (§3.3): mix object cubes of the batch with each other, rescaled
  to the same size; the mixed objects keep their (positive) targets.

Shapes: patches ``(B, 1, Z, Y, X)``; per-anchor targets ``(B, N)`` in the flat order of
:class:`medssl.detection.AnchorGrid`; per-level maps ``(B, C, z, y, x)``.

Choices the paper leaves open (documented in README "FocalMix" and the model card):

* Target guessing runs the model in train mode (BatchNorm batch statistics, as the MixMatch
  reference implementations guess), without gradients, on K *distinct* group elements (the
  identity may be among them).
* The guessed targets of an unlabeled patch are carried through the random group
  element that augments it for training (MixMatch trains on augmented unlabeled data).
* Image MixUp: one λ per step, as the official MixMatch code draws it. Ignored anchors
  (IoU in [0.1, 0.3]) stay ignored after mixing if either source ignores them.
  Box regression is trained only on the labeled half, on the positive anchors of the
  dominant (λ̃ >= 0.5) image with its own box targets; guessed targets carry no boxes.
* Object MixUp: the objects of an unlabeled patch are its anchors with a guessed
  (pre-sharpening) probability >= ``object_threshold`` after 3D NMS, taken as anchor cubes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medssl.detection import AnchorGrid, CubeSymmetry
from medssl.detection.nms import nms_3d
from medssl.training.detector import flatten_levels

__all__ = [
    "apply_symmetry",
    "guess_targets",
    "image_mixup",
    "object_mixup",
    "objects_from_targets",
    "sample_lambda",
    "sharpen",
    "transform_anchor_targets",
]


def apply_symmetry(g: CubeSymmetry, tensor: torch.Tensor) -> torch.Tensor:
    """Apply a cube symmetry to the last three axes of a tensor."""
    out = tensor.permute(g.axes_order(tensor.ndim))
    axes = g.flip_axes(tensor.ndim)
    return torch.flip(out, axes) if axes else out


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Two-class sharpening of anchor probabilities: ``p^(1/T) / (p^(1/T) + (1 − p)^(1/T))``."""
    p = p.clamp(1e-6, 1 - 1e-6)
    a, b = p.pow(1 / temperature), (1 - p).pow(1 / temperature)
    return a / (a + b)


def _split_levels(flat: torch.Tensor, grid: AnchorGrid) -> list[torch.Tensor]:
    """``(B, N)`` → per-level ``(B, 1, z, y, x)`` maps."""
    return [flat[:, s].reshape(flat.shape[0], 1, *shape) for s, shape in zip(grid.level_slices, grid.level_shapes)]


@torch.no_grad()
def guess_targets(
    model: nn.Module,
    patches: torch.Tensor,
    elements: Sequence[CubeSymmetry],
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor-level target prediction for unlabeled patches (§3.2).

    Args:
        model: the detector; called as ``model(x) -> list of (B, 5, z, y, x)``.
        patches: ``(B, 1, Z, Y, X)`` unlabeled patches (cubic, or any shape the
            elements keep: permutations of a non-cubic patch change its shape).
        elements: the K group elements to ensemble over.
        temperature: sharpening temperature T (paper: 0.7).

    Returns:
        ``(sharpened, averaged)`` anchor probabilities, both ``(B, N)`` in the original
        patch's anchor order.
    """
    total = None
    for g in elements:
        levels = model(apply_symmetry(g, patches))
        back = [apply_symmetry(g.inverse(), torch.sigmoid(m[:, :1].float())) for m in levels]
        probs = flatten_levels(back)[..., 0]
        total = probs if total is None else total + probs
    assert total is not None, "need at least one group element"
    mean = total / len(elements)
    return sharpen(mean, temperature), mean


def transform_anchor_targets(g: CubeSymmetry, targets: torch.Tensor, grid: AnchorGrid) -> torch.Tensor:
    """Carry per-anchor targets ``(B, N)`` of a patch to the patch transformed by ``g``."""
    levels = [apply_symmetry(g, m) for m in _split_levels(targets, grid)]
    return flatten_levels(levels)[..., 0]


def sample_lambda(eta: float, rng: np.random.Generator) -> float:
    """``λ̃ = max(λ, 1 − λ)`` with ``λ ~ Beta(η, η)`` (MixMatch eq. 8-9; paper η = 0.2)."""
    lam = float(rng.beta(eta, eta))
    return max(lam, 1.0 - lam)


def image_mixup(
    images: torch.Tensor, targets: torch.Tensor, other_images: torch.Tensor, other_targets: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-level MixUp (eq. 10-13): ``x̂ = λ̃x + (1 − λ̃)x'`` and ``ŷ_i = λ̃y_i + (1 − λ̃)y'_i``.

    Args:
        images, other_images: ``(B, 1, Z, Y, X)``.
        targets, other_targets: ``(B, N)`` anchor targets in [0, 1]; -1 = ignored.
        lam: λ̃ in [0.5, 1].

    Returns:
        Mixed images and targets; an anchor ignored in either source is ignored.
    """
    mixed = lam * images + (1 - lam) * other_images
    ignored = (targets < 0) | (other_targets < 0)
    y = lam * targets.clamp(min=0) + (1 - lam) * other_targets.clamp(min=0)
    return mixed, torch.where(ignored, torch.full_like(y, -1.0), y)


def objects_from_targets(
    probabilities: torch.Tensor, grid: AnchorGrid, threshold: float, nms_iou: float = 0.1, max_objects: int = 8
) -> list[np.ndarray]:
    """High-confidence predicted objects of unlabeled patches, as anchor cubes.

    Args:
        probabilities: ``(B, N)`` guessed anchor probabilities.
        threshold: minimum probability of an object.

    Returns:
        Per patch, ``(M, 4)`` cubes ``(z, y, x, d)`` in the patch frame (after 3D NMS).
    """
    out = []
    for row in probabilities.detach().float().cpu().numpy():
        idx = np.flatnonzero(row >= threshold)
        boxes = np.concatenate([grid.centres[idx], grid.sizes[idx, None]], axis=1)
        keep = nms_3d(boxes, row[idx], nms_iou, max_keep=max_objects)
        out.append(boxes[keep])
    return out


def _cube_slices(box: np.ndarray, shape: Sequence[int]) -> tuple[slice, slice, slice] | None:
    """The voxel slices of cube ``(z, y, x, d)`` clipped to ``shape``; None if empty."""
    half = max(float(box[3]) / 2, 1.0)
    lo = [max(0, int(np.floor(c - half + 0.5))) for c in box[:3]]
    hi = [min(int(n), int(np.floor(c + half + 0.5))) for c, n in zip(box[:3], shape)]
    if any(h - low < 2 for low, h in zip(lo, hi)):
        return None
    return tuple(slice(a, b) for a, b in zip(lo, hi))  # type: ignore[return-value]


def object_mixup(
    images: torch.Tensor,
    objects: Sequence[np.ndarray],
    sources: torch.Tensor,
    source_objects: Sequence[np.ndarray],
    eta: float,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Object-level MixUp (§3.3): mix each object with another object of the batch.

    Every object cube of ``images[i]`` (listed in ``objects[i]``) is blended with a
    randomly chosen *other* object of the batch pool (``source_objects`` in
    ``sources``), cropped from its source, resized (trilinear) to the object's cube and
    mixed with ``λ̃`` drawn per pair. Targets are not changed: object targets stay positive.

    Args:
        images: ``(B, 1, Z, Y, X)`` the batch after image-level MixUp.
        objects: per image, ``(M_i, 4)`` its objects' cubes (voxels).
        sources: ``(S, 1, Z, Y, X)`` the unmixed patches objects are taken from.
        source_objects: per source patch, ``(K_s, 4)`` its objects' cubes.
        eta: Beta parameter η.

    Returns:
        A new ``(B, 1, Z, Y, X)`` tensor.
    """
    pool = [(s, box) for s, boxes in enumerate(source_objects) for box in boxes]
    out = images.clone()
    if len(pool) < 2:
        return out
    shape = images.shape[2:]
    for i, boxes in enumerate(objects):
        for box in boxes:
            target = _cube_slices(box, shape)
            choices = [j for j, (_, b) in enumerate(pool) if not np.allclose(b, box)]
            if target is None or not choices:
                continue
            s, partner = pool[choices[int(rng.integers(len(choices)))]]
            source = _cube_slices(partner, shape)
            if source is None:
                continue
            crop = sources[s : s + 1, :, source[0], source[1], source[2]]
            size = [sl.stop - sl.start for sl in target]
            resized = F.interpolate(crop, size=size, mode="trilinear", align_corners=False)[0]
            lam = sample_lambda(eta, rng)
            region = out[i, :, target[0], target[1], target[2]]
            out[i, :, target[0], target[1], target[2]] = lam * region + (1 - lam) * resized
    return out
