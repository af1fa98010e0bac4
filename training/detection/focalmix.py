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
  identity may be among them), and leaves the BatchNorm running statistics exactly as they
  were (:func:`~medssl.training.batchnorm.batch_statistics_only`): MixMatch's official code
  drops the update ops its guessing passes create (``skip_ops``), so the K augmented unlabeled
  passes never move the statistics inference uses (issue 18: they did, and cost CPM).
* The guessed targets of an unlabeled patch are carried through the random group
  element that augments it for training (MixMatch trains on augmented unlabeled data).
* Image MixUp: one λ per step, as the common PyTorch MixMatch code draws it (the official
  TensorFlow code, google-research/mixmatch ``MixMode.augment_pair``, draws one per sample;
  the paper's eq. 10-13 do not say). Ignored anchors
  (IoU in [0.1, 0.3]) stay ignored after mixing if either source ignores them.
  Box regression is trained only on the labeled half, on the positive anchors of the
  dominant (λ̃ >= 0.5) image with its own box targets; guessed targets carry no boxes.
* Object MixUp: the objects of an unlabeled patch are its anchors with a guessed
  (pre-sharpening) probability >= ``object_threshold`` after 3D NMS, taken as anchor cubes
  (``focalmix.object_policy: fixed``).

CPL object selection (``focalmix.object_policy: flexmatch``, :class:`CPLObjectSelection`)
-----------------------------------------------------------------------------------------
FlexMatch's curriculum pseudo-labelling (Zhang et al., NeurIPS 2021) as the choice of
high-confidence objects: a two-class :class:`~medssl.training.threshold.FlexMatchThreshold`
(class 0 background, class 1 nodule) on the guessed probabilities as ``(1 − p, p)``; an
anchor is an object where the policy keeps it *and* its label is "nodule", i.e.
``p > 0.5`` (argmax; ``p = 0.5`` ties to background) and ``p ≥ T_t(nodule)``; then the same
3D NMS. The policy's formulas, official-code order (mask with the memory before the batch,
then update) and warm-up are those of :mod:`medssl.training.threshold` (official defaults:
warm-up on, convex mapping).

* **τ = ``object_threshold``** (0.8), not FlexMatch's 0.95: τ is both the memory-write cut
  (a cell is remembered as "nodule" when ``p ≥ τ``, as "background" when ``p ≤ 1 − τ``) and the
  ceiling of every threshold (``T ≤ τ``), so CPL is never stricter than FocalMix's fixed
  choice and the two variants differ only by the curriculum. (0.95 would make a nodule memory
  entry rarer still and let ``T(nodule)`` exceed FocalMix's 0.8.)
* **What a sample is.** A per-patch or per-anchor-of-a-patch memory has no stable identity
  (crops are random) — the same problem as for segmentation (that module's "what a sample
  is"). A sample is a **cell of a fixed grid over each unlabeled scan's cached volume**: cell
  ``(gz, gy, gx)`` of scan ``k`` covers voxels ``[g·m, (g + 1)·m)`` per axis, ``m =
  object_memory_stride`` (default 8 voxels = 8 mm at the 1 mm model grid, about one nodule
  centre per cell), and uses :class:`~medssl.training.threshold.VoxelMemoryLayout`'s indexing
  (``offset[k] + (gz·GY + gy)·GX + gx``). An anchor belongs to the cell holding its reference
  voxel ``start + ⌊centre⌋`` (the crop corner ``start`` in the scan; anchors in padding have
  no cell). A cell's verdict in a batch is that of its most nodule-like anchor (max ``p`` over
  every anchor, level and patch of the batch in it), so it is written "nodule" if some anchor
  centred there is confidently a nodule and "background" only if all are confidently
  background: the memory reads "where are the nodule centres". Memory: a LUNA16 scan of
  ~300×340×340 mm is ~70k cells at m = 8, 100 unlabeled scans ~7 MB (``int8``).
* **Class imbalance.** Nodule cells are rare (a few per scan against thousands of background
  cells), so ``σ(nodule) ≪ σ(background)``: ``β(background) → 1`` and ``T(background) → τ``,
  while ``β(nodule)`` is ~10⁻³ and ``T(nodule) = M(β)·τ ≈ 0``. ``T(nodule)`` only exceeds the
  argmax cut 0.5 when ``M(β) > 0.5/τ = 0.625`` (τ = 0.8), i.e. ``β(nodule) > 0.77``: nodule cells
  at least 77 % as
  many as background cells, which detection never reaches. In practice CPL therefore selects
  the anchors with ``p > 0.5`` during the whole run (at t = 0 every threshold is 0, as in
  FlexMatch), a lower, constant cut than FocalMix's 0.8 — CPL's "lenient thresholds for
  hard/rare classes" taken to its limit, not a curriculum. The background threshold never
  matters here (background anchors are not objects). The benchmark reports whether the
  extra, less certain objects help (``benchmarks/focalmix_ssl.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medssl.detection import AnchorGrid, CubeSymmetry
from medssl.detection.nms import nms_3d
from medssl.training.batchnorm import batch_statistics_only
from medssl.training.networks.detector import flatten_levels
from medssl.training.threshold import FlexMatchThreshold, VoxelMemoryLayout

__all__ = [
    "CPLObjectSelection",
    "anchor_cell_ids",
    "apply_symmetry",
    "cell_probabilities",
    "guess_targets",
    "image_mixup",
    "nodule_probabilities",
    "object_mixup",
    "objects_from_mask",
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
    return [
        flat[:, s].reshape(flat.shape[0], 1, *shape)
        for s, shape in zip(grid.level_slices, grid.level_shapes)
    ]


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

    The model runs in the mode it is in (train mode: BatchNorm batch statistics); its BatchNorm
    running statistics are left unchanged.

    Returns:
        ``(sharpened, averaged)`` anchor probabilities, both ``(B, N)`` in the original
        patch's anchor order.
    """
    total = None
    with batch_statistics_only(model):
        for g in elements:
            levels = model(apply_symmetry(g, patches))
            back = [apply_symmetry(g.inverse(), torch.sigmoid(m[:, :1].float())) for m in levels]
            probs = flatten_levels(back)[..., 0]
            total = probs if total is None else total + probs
    assert total is not None, "need at least one group element"
    mean = total / len(elements)
    return sharpen(mean, temperature), mean


def transform_anchor_targets(
    g: CubeSymmetry, targets: torch.Tensor, grid: AnchorGrid
) -> torch.Tensor:
    """Carry per-anchor targets ``(B, N)`` of a patch to the patch transformed by ``g``."""
    levels = [apply_symmetry(g, m) for m in _split_levels(targets, grid)]
    return flatten_levels(levels)[..., 0]


def sample_lambda(eta: float, rng: np.random.Generator) -> float:
    """``λ̃ = max(λ, 1 − λ)`` with ``λ ~ Beta(η, η)`` (MixMatch eq. 8-9; paper η = 0.2)."""
    lam = float(rng.beta(eta, eta))
    return max(lam, 1.0 - lam)


def image_mixup(
    images: torch.Tensor,
    targets: torch.Tensor,
    other_images: torch.Tensor,
    other_targets: torch.Tensor,
    lam: float,
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
    probabilities: torch.Tensor,
    grid: AnchorGrid,
    threshold: float,
    nms_iou: float = 0.1,
    max_objects: int = 8,
) -> list[np.ndarray]:
    """High-confidence predicted objects of unlabeled patches, as anchor cubes (FocalMix's
    fixed threshold).

    Args:
        probabilities: ``(B, N)`` guessed anchor probabilities.
        threshold: minimum probability of an object.

    Returns:
        Per patch, ``(M, 4)`` cubes ``(z, y, x, d)`` in the patch frame (after 3D NMS).
    """
    probs = probabilities.detach().float().cpu().numpy()
    return _nms_objects(probs, probs >= threshold, grid, nms_iou, max_objects)


def objects_from_mask(
    probabilities: torch.Tensor,
    selected: torch.Tensor,
    grid: AnchorGrid,
    nms_iou: float = 0.1,
    max_objects: int = 8,
) -> list[np.ndarray]:
    """The objects among chosen anchors (e.g. :meth:`CPLObjectSelection.select`), as anchor cubes.

    Args:
        probabilities: ``(B, N)`` guessed anchor probabilities (the NMS scores).
        selected: ``(B, N)`` bool, the anchors that may be objects.

    Returns:
        Per patch, ``(M, 4)`` cubes ``(z, y, x, d)`` in the patch frame (after 3D NMS).
    """
    if tuple(selected.shape) != tuple(probabilities.shape):
        raise ValueError(
            f"selected has shape {tuple(selected.shape)}, "
            f"probabilities {tuple(probabilities.shape)}"
        )
    return _nms_objects(
        probabilities.detach().float().cpu().numpy(),
        selected.cpu().numpy(),
        grid,
        nms_iou,
        max_objects,
    )


def _nms_objects(
    probs: np.ndarray, selected: np.ndarray, grid: AnchorGrid, nms_iou: float, max_objects: int
) -> list[np.ndarray]:
    """Per row of ``(B, N)`` scores, 3D NMS over the ``selected`` anchors' cubes."""
    out = []
    for row, chosen in zip(probs, selected):
        idx = np.flatnonzero(chosen)
        boxes = np.concatenate([grid.centres[idx], grid.sizes[idx, None]], axis=1)
        keep = nms_3d(boxes, row[idx], nms_iou, max_keep=max_objects)
        out.append(boxes[keep])
    return out


def nodule_probabilities(probabilities: torch.Tensor) -> torch.Tensor:
    """Anchor nodule probabilities ``p (B, N)`` as two-class probabilities ``(B, 2, N)``:
    class 0 background ``1 − p``, class 1 nodule ``p`` (float32)."""
    p = probabilities.detach().float()
    return torch.stack([1 - p, p], dim=1)


def anchor_cell_ids(
    layout: VoxelMemoryLayout, grid: AnchorGrid, cases: torch.Tensor, starts: torch.Tensor
) -> torch.Tensor:
    """The CPL memory cell of every anchor of unlabeled crops (module docstring).

    Args:
        layout: the memory layout over the unlabeled scans' cached volumes; its ``stride`` is
            the cell edge ``m``, voxels.
        grid: anchors of a ``(P, P, P)`` crop.
        cases: ``(B,)`` each crop's scan index (position in ``layout.case_shapes``).
        starts: ``(B, 3)`` each crop's corner ``(z, y, x)`` in its scan's voxels.

    Returns:
        ``(B, N)`` int64 memory indices in the crop's (untransformed) anchor order; ``-1`` for
        anchors whose reference voxel ``start + ⌊centre⌋`` lies outside the scan.
    """
    if cases.ndim != 1 or tuple(starts.shape) != (len(cases), 3):
        raise ValueError(
            f"need cases (B,) and starts (B, 3), got {tuple(cases.shape)}, {tuple(starts.shape)}"
        )
    reference = np.floor(grid.centres).astype(np.int64)  # (N, 3) voxels in the crop
    stride = np.asarray(layout.stride, dtype=np.int64)
    out = np.full((len(cases), grid.n_anchors), -1, dtype=np.int64)
    for b, (case, start) in enumerate(zip(cases.tolist(), starts.cpu().numpy())):
        if not 0 <= case < layout.n_cases:
            raise ValueError(f"case index {case} out of range [0, {layout.n_cases})")
        voxels = reference + start.astype(np.int64)
        inside = np.all((voxels >= 0) & (voxels < np.asarray(layout.case_shapes[case])), axis=1)
        cz, cy, cx = (voxels[inside] // stride).T
        _, grid_y, grid_x = layout.grid_shapes[case]
        out[b, inside] = layout.offsets[case] + (cz * grid_y + cy) * grid_x + cx
    return torch.from_numpy(out)


def cell_probabilities(
    probabilities: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One verdict per memory cell of a batch: its most nodule-like anchor.

    Args:
        probabilities: ``(B, N)`` guessed anchor probabilities.
        ids: ``(B, N)`` int64 cells (:func:`anchor_cell_ids`), ``-1`` = none.

    Returns:
        ``(M, 2)`` two-class probabilities (:func:`nodule_probabilities`) of the ``M`` distinct
        cells, ``p`` = max over their anchors, and ``(M,)`` their ids (ascending), on the CPU.
    """
    p, ids = probabilities.detach().float().cpu().reshape(-1), ids.cpu().reshape(-1)
    valid = ids >= 0
    cells, inverse = torch.unique(ids[valid], return_inverse=True)
    best = torch.zeros(len(cells)).scatter_reduce(
        0, inverse, p[valid], reduce="amax", include_self=False
    )
    return nodule_probabilities(best[:, None])[..., 0], cells


class CPLObjectSelection:
    """FlexMatch CPL as FocalMix's choice of unlabeled objects (module docstring).

    Args:
        case_shapes: each unlabeled scan's cached volume shape ``(Z, Y, X)``, in the order of
            the crops' ``case`` index.
        tau: CPL's τ (``focalmix.object_threshold``).
        memory_stride: the memory cell edge ``m``, voxels (``focalmix.object_memory_stride``).
    """

    def __init__(
        self, case_shapes: Sequence[Sequence[int]], *, tau: float, memory_stride: int = 8
    ) -> None:
        self.layout = VoxelMemoryLayout(case_shapes, memory_stride)
        self.policy = FlexMatchThreshold(2, self.layout.n_samples, tau=tau)

    def select(self, probabilities: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` bool: anchors kept as "nodule" by the current thresholds (no state change)."""
        labels, keep = self.policy.mask(nodule_probabilities(probabilities))
        return (labels == 1) & keep

    def update(
        self,
        probabilities: torch.Tensor,
        grid: AnchorGrid,
        cases: torch.Tensor,
        starts: torch.Tensor,
    ) -> None:
        """Record a batch: ``probabilities (B, N)`` in the crops' untransformed anchor order,
        ``cases (B,)``, ``starts (B, 3)`` as :func:`anchor_cell_ids`. Call after :meth:`select`
        (FlexMatch's order)."""
        cells, ids = cell_probabilities(
            probabilities, anchor_cell_ids(self.layout, grid, cases, starts)
        )
        self.policy.update(cells, ids)

    def nodule_threshold(self) -> float:
        """``T_t(nodule)``: the threshold :meth:`select` applies now."""
        return float(self.policy.thresholds()[1])

    def learning_effect(self) -> tuple[int, int]:
        """σ_t: cells remembered as ``(background, nodule)``."""
        sigma = self.policy.learning_effect()
        return int(sigma[0]), int(sigma[1])

    def state_dict(self) -> dict[str, Any]:
        """The policy's state (configuration and memory), for checkpoints."""
        return self.policy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` if τ or the memory size differ."""
        self.policy.load_state_dict(state)


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
