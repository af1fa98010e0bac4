"""Cubic anchors of a 3D feature pyramid, and how ground-truth cubes are assigned to them.

Frames and units: every coordinate here is a voxel index ``(z, y, x)`` of the model's
input grid (1 mm isotropic for the FocalMix detector, so voxels are millimetres);
voxel ``i`` is centred at ``i``. A box is a cube ``(z, y, x, d)``: its centre and its
edge length ``d`` (the nodule diameter).

Anchor layout (FocalMix paper §4.1, DeepLung/3D-FPN practice): pyramid level ``l`` has
stride ``s_l`` and one cubic anchor of edge ``a_l`` per output cell. Cell ``i`` covers
input voxels ``[i s, (i + 1) s - 1]``, so its anchor is centred at ``i s + (s - 1) / 2``.
With a patch edge divisible by the largest stride, a flip maps this set of centres onto
itself (``N - 1 - c``), which is what FocalMix's anchor-level target prediction needs
(§3.2). Anchors are flattened level by level, each level in C order over ``(z, y, x)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "AnchorGrid",
    "AnchorSpec",
    "AnchorTargets",
    "assign_anchors",
    "cube_iou",
    "encode_boxes",
]

#: Anchor labels: positive, negative, ignored (IoU between the two thresholds).
POSITIVE, NEGATIVE, IGNORE = 1.0, 0.0, -1.0


@dataclass(frozen=True)
class AnchorSpec:
    """Strides and anchor edges of the pyramid levels, and the assignment thresholds.

    Attributes:
        strides: output stride of each level, voxels; FocalMix: ``(2, 4, 8, 16)``.
        sizes: anchor edge of each level, voxels; FocalMix: ``(4, 8, 16, 32)``.
        positive_iou: an anchor whose best IoU with a ground-truth cube is above this
            is positive (paper: 0.3).
        negative_iou: below this it is negative (paper: 0.1); in between, ignored.
        match_best: also make each ground truth's best anchor positive (when its IoU
            is at least ``negative_iou``), so a nodule between anchor sizes is never
            left without a positive. RetinaNet's "low-quality matches"; not in the paper.
    """

    strides: tuple[int, ...] = (2, 4, 8, 16)
    sizes: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)
    positive_iou: float = 0.3
    negative_iou: float = 0.1
    match_best: bool = True

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.sizes) or not self.strides:
            raise ValueError(f"strides {self.strides} and sizes {self.sizes} must pair up")
        if any(s <= 0 for s in self.strides) or list(self.strides) != sorted(self.strides):
            raise ValueError(f"strides must be positive and increasing, got {self.strides}")
        if any(a <= 0 for a in self.sizes):
            raise ValueError(f"anchor sizes must be positive, got {self.sizes}")
        if not 0 <= self.negative_iou <= self.positive_iou <= 1:
            raise ValueError(
                f"need 0 <= negative_iou <= positive_iou <= 1, got "
                f"{self.negative_iou}, {self.positive_iou}"
            )

    @property
    def max_stride(self) -> int:
        return self.strides[-1]

    def level_shapes(self, patch_shape: Sequence[int]) -> list[tuple[int, int, int]]:
        """Output grid ``(Z/s, Y/s, X/s)`` of each level for an input patch ``(Z, Y, X)``.

        Raises:
            ValueError: a patch edge is not a multiple of the largest stride.
        """
        if len(patch_shape) != 3 or any(int(n) % self.max_stride for n in patch_shape):
            raise ValueError(
                f"patch shape {tuple(patch_shape)} must be 3 edges divisible by the largest "
                f"stride {self.max_stride}, so that flips and rotations map anchors onto anchors"
            )
        z, y, x = (int(n) for n in patch_shape)
        return [(z // s, y // s, x // s) for s in self.strides]


@dataclass(frozen=True)
class AnchorGrid:
    """Every anchor of a patch.

    Attributes:
        centres: ``(N, 3)`` float32 anchor centres, voxels ``(z, y, x)``.
        sizes: ``(N,)`` float32 anchor edges, voxels.
        level_shapes: output grid of each level.
        level_slices: where each level's anchors sit in the flat order.
    """

    spec: AnchorSpec
    patch_shape: tuple[int, int, int]
    centres: np.ndarray = field(repr=False)
    sizes: np.ndarray = field(repr=False)
    level_shapes: tuple[tuple[int, int, int], ...]
    level_slices: tuple[slice, ...]

    @classmethod
    def build(cls, spec: AnchorSpec, patch_shape: Sequence[int]) -> AnchorGrid:
        """The anchors of a ``(Z, Y, X)`` patch (edges divisible by the largest stride)."""
        shapes = spec.level_shapes(patch_shape)
        z, y, x = (int(n) for n in patch_shape)  # three edges: level_shapes checked
        centres, sizes, slices, start = [], [], [], 0
        for stride, size, shape in zip(spec.strides, spec.sizes, shapes):
            axes = [np.arange(n, dtype=np.float32) * stride + (stride - 1) / 2 for n in shape]
            grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
            centres.append(grid)
            sizes.append(np.full(len(grid), size, dtype=np.float32))
            slices.append(slice(start, start + len(grid)))
            start += len(grid)
        return cls(
            spec,
            (z, y, x),
            np.concatenate(centres),
            np.concatenate(sizes),
            tuple(shapes),
            tuple(slices),
        )

    @property
    def n_anchors(self) -> int:
        return len(self.sizes)


@dataclass(frozen=True)
class AnchorTargets:
    """Training targets of one patch.

    Attributes:
        labels: ``(N,)`` float32: 1 positive, 0 negative, -1 ignored.
        deltas: ``(N, 4)`` float32 box-regression targets (:func:`encode_boxes`); zero
            where the anchor is not positive.
        matched: ``(N,)`` int64 index of the ground-truth box of each positive anchor, -1 else.
    """

    labels: np.ndarray
    deltas: np.ndarray
    matched: np.ndarray


def cube_iou(
    centres_a: np.ndarray, sizes_a: np.ndarray, centres_b: np.ndarray, sizes_b: np.ndarray
) -> np.ndarray:
    """Intersection over union of axis-aligned cubes.

    Args:
        centres_a: ``(N, 3)``; sizes_a: ``(N,)`` edges. centres_b: ``(M, 3)``; sizes_b: ``(M,)``.
            Any consistent unit.

    Returns:
        ``(N, M)`` IoU in [0, 1].
    """
    ca, cb = np.asarray(centres_a, np.float64), np.asarray(centres_b, np.float64)
    ha, hb = np.asarray(sizes_a, np.float64) / 2, np.asarray(sizes_b, np.float64) / 2
    lo = np.maximum(ca[:, None, :] - ha[:, None, None], cb[None, :, :] - hb[None, :, None])
    hi = np.minimum(ca[:, None, :] + ha[:, None, None], cb[None, :, :] + hb[None, :, None])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    union = (2 * ha[:, None]) ** 3 + (2 * hb[None, :]) ** 3 - inter
    return inter / np.maximum(union, 1e-12)


def encode_boxes(
    anchor_centres: np.ndarray, anchor_sizes: np.ndarray, boxes: np.ndarray
) -> np.ndarray:
    """Box-regression targets of ``boxes`` relative to their anchors (DeepLung encoding).

    ``(dz, dy, dx) = (box centre - anchor centre) / anchor edge`` and
    ``dd = ln(box edge / anchor edge)``. Decoding is its inverse (in the model graph).

    Args:
        anchor_centres: ``(N, 3)`` voxels; anchor_sizes: ``(N,)``; boxes: ``(N, 4)`` ``(z, y, x,
        d)``.

    Returns:
        ``(N, 4)`` float32.
    """
    size = anchor_sizes[:, None]
    offsets = (boxes[:, :3] - anchor_centres) / size
    scale = np.log(boxes[:, 3:4] / size)
    return np.concatenate([offsets, scale], axis=1).astype(np.float32)


def assign_anchors(grid: AnchorGrid, boxes: np.ndarray) -> AnchorTargets:
    """Label every anchor against the ground-truth cubes of a patch (paper §4.1).

    Args:
        grid: the patch's anchors.
        boxes: ``(M, 4)`` ground-truth cubes ``(z, y, x, d)`` in the patch's voxel frame;
            ``M`` may be 0 (every anchor negative).

    Returns:
        Labels (IoU > ``positive_iou``: 1; < ``negative_iou``: 0; else -1), regression
        targets and matches.
    """
    n = grid.n_anchors
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.zeros(n, dtype=np.float32)
    matched = np.full(n, -1, dtype=np.int64)
    deltas = np.zeros((n, 4), dtype=np.float32)
    if len(boxes) == 0:
        return AnchorTargets(labels, deltas, matched)
    iou = _near_iou(grid, boxes)
    best = iou.argmax(axis=1)
    best_iou = iou[np.arange(n), best]
    spec = grid.spec
    labels[(best_iou >= spec.negative_iou) & (best_iou <= spec.positive_iou)] = IGNORE
    positive = best_iou > spec.positive_iou
    if spec.match_best:
        for m in range(len(boxes)):
            top = iou[:, m].max()
            if top >= spec.negative_iou and top > 0:
                winners = np.flatnonzero(iou[:, m] == top)
                positive[winners] = True
                best[winners] = m
    labels[positive] = POSITIVE
    matched[positive] = best[positive]
    deltas[positive] = encode_boxes(
        grid.centres[positive], grid.sizes[positive], boxes[best[positive]]
    )
    return AnchorTargets(labels, deltas, matched)


def _near_iou(grid: AnchorGrid, boxes: np.ndarray) -> np.ndarray:
    """``(N, M)`` cube IoU, computed only for anchors that can overlap a box (zero elsewhere)."""
    iou = np.zeros((grid.n_anchors, len(boxes)), dtype=np.float64)
    reach = (grid.sizes.max() + boxes[:, 3].max()) / 2
    lo, hi = boxes[:, :3].min(axis=0) - reach, boxes[:, :3].max(axis=0) + reach
    near = np.flatnonzero(np.all((grid.centres >= lo) & (grid.centres <= hi), axis=1))
    if len(near):
        iou[near] = cube_iou(grid.centres[near], grid.sizes[near], boxes[:, :3], boxes[:, 3])
    return iou
