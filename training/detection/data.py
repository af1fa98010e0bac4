"""Training patches for the nodule detector, from cached preprocessed scans.

Every sample is a pure function of ``(seed, index)`` and the mined crop centres the dataset
holds (hard negatives, unlabeled candidates: :mod:`medssl.training.detection.mining`): the sampler
hands out a running index, so a run is reproducible with any number of DataLoader workers and
a resumed run (with its checkpoint's mined lists) continues the same sample stream.

Frames: scans are cached on the model grid (1 mm isotropic by default, see
:class:`medssl.training.cache.VolumeCache`); boxes are cubes ``(z, y, x, d)`` in the
patch's voxel frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from medssl.detection import CUBE_GROUP, AnchorGrid, assign_anchors
from medssl.pipeline.windows import extract_window
from medssl.training.cache import CachedVolume
from medssl.training.detection.augment import ScannerAugment

__all__ = ["MAX_BOXES", "LabeledPatches", "ScanBoxes", "UnlabeledPatches"]

#: Ground-truth cubes returned per patch (padded with zeros); extra ones still get anchors.
MAX_BOXES = 16


@dataclass(frozen=True)
class ScanBoxes:
    """A cached scan and its nodules as cubes ``(z, y, x, d)`` on the cached grid, ``(M, 4)``."""

    volume: CachedVolume
    boxes: np.ndarray


def _random_start(rng: np.random.Generator, shape: Sequence[int], patch: int) -> np.ndarray:
    return np.array([rng.integers(0, max(n - patch, 0) + 1) for n in shape])


def _start_around(
    rng: np.random.Generator, centre: np.ndarray, shape: Sequence[int], patch: int, margin: float
) -> np.ndarray:
    """A patch start that puts ``centre`` at least ``margin`` voxels inside the patch."""
    lo = np.floor(centre + margin - patch + 1).astype(int)
    hi = np.ceil(centre - margin).astype(int)
    start = np.array([rng.integers(a, max(a, b) + 1) for a, b in zip(lo, hi)])
    upper = np.maximum(np.asarray(shape) - patch, 0)
    return np.clip(start, np.minimum(0, upper), upper)


def _with_centres(centres: Sequence[np.ndarray] | None, n_scans: int, what: str) -> list[int]:
    """The scans that have at least one crop centre; checks one ``(M, 3)`` list per scan."""
    if centres is None:
        return []
    if len(centres) != n_scans or any(np.ndim(c) != 2 or np.shape(c)[1] != 3 for c in centres):
        raise ValueError(
            f"{what} must be one (M, 3) array of voxel centres per scan ({n_scans} scans)"
        )
    return [i for i, c in enumerate(centres) if len(c)]


class LabeledPatches(Dataset):
    """Patches balanced between nodule-centred, hard-negative-centred and random crops, with
    anchor targets.

    Args:
        scans: labeled scans.
        grid: anchors of a ``(P, P, P)`` patch.
        positive_fraction: share of crops that contain a nodule (paper: balanced).
        augment: apply a random element of the 48-element cube group.
        pad_value: intensity outside the scan (preprocessed air).
        seed: sample stream seed.
        hard_negatives: per scan, ``(M_i, 3)`` voxel centres of mined false positives
            (:mod:`medssl.training.detection.mining`); None or empty lists: none yet.
        hard_negative_fraction: share of crops centred (with jitter: the centre anywhere at
            least ``P/4`` inside the crop) on a hard negative, drawn from the random share;
            ``positive_fraction + hard_negative_fraction <= 1``.
        scanner: scanner augmentation (noise, kernel, slice thickness) of the crop's
            intensities after the cube-group transform (:mod:`medssl.training.detection.augment`);
            None: none. Its draws come after every other draw of the item, so the crops and
            targets are those of the stream without it.

    Item ``i`` is a pure function of ``(seed, i, hard_negatives)``: ``image (1, P, P, P)``
    float32, ``labels (N,)`` (1 / 0 / -1 ignored), ``deltas (N, 4)``, ``boxes (MAX_BOXES, 4)``
    (zero rows = padding), ``n_boxes``. A crop centred on a hard negative keeps the targets of
    every nodule inside it. Without hard negatives the stream is that of the plain sampler.
    """

    def __init__(
        self,
        scans: Sequence[ScanBoxes],
        grid: AnchorGrid,
        positive_fraction: float = 0.5,
        augment: bool = True,
        pad_value: float = -1.0,
        seed: int = 0,
        *,
        hard_negatives: Sequence[np.ndarray] | None = None,
        hard_negative_fraction: float = 0.0,
        scanner: ScannerAugment | None = None,
    ) -> None:
        if not scans:
            raise ValueError("no labeled scans")
        if not (hard_negative_fraction >= 0 and positive_fraction + hard_negative_fraction <= 1):
            raise ValueError(
                f"need hard_negative_fraction >= 0 and positive_fraction + hard_negative_fraction "
                f"<= 1, got {positive_fraction} + {hard_negative_fraction}"
            )
        self.scans, self.grid = list(scans), grid
        self.patch = grid.patch_shape[0]
        self.positive_fraction, self.augment = positive_fraction, augment
        self.pad_value, self.seed = pad_value, seed
        self._with_nodules = [i for i, s in enumerate(self.scans) if len(s.boxes)]
        self.hard_negatives = (
            None if hard_negatives is None else [np.asarray(c, np.float32) for c in hard_negatives]
        )
        self.hard_negative_fraction = hard_negative_fraction
        self.scanner = scanner
        self._with_negatives = (
            _with_centres(self.hard_negatives, len(self.scans), "hard_negatives")
            if hard_negative_fraction > 0
            else []
        )

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 1, index])
        draw = rng.random() if (self._with_nodules or self._with_negatives) else 1.0
        positive = self.positive_fraction if self._with_nodules else 0.0
        if draw < positive:
            scan = self.scans[self._with_nodules[rng.integers(len(self._with_nodules))]]
            box = scan.boxes[rng.integers(len(scan.boxes))]
            margin = min(box[3] / 2, self.patch / 4)
            start = _start_around(rng, box[:3], scan.volume.array.shape, self.patch, margin)
        elif draw < positive + self.hard_negative_fraction and self._with_negatives:
            case = self._with_negatives[rng.integers(len(self._with_negatives))]
            scan, centres = self.scans[case], self.hard_negatives[case]  # type: ignore[index]
            centre = centres[rng.integers(len(centres))]
            start = _start_around(rng, centre, scan.volume.array.shape, self.patch, self.patch / 4)
        else:
            scan = self.scans[rng.integers(len(self.scans))]
            start = _random_start(rng, scan.volume.array.shape, self.patch)
        image = extract_window(scan.volume.array, tuple(start), (self.patch,) * 3, self.pad_value)
        boxes = scan.boxes.copy()
        boxes[:, :3] -= start
        inside = np.all((boxes[:, :3] >= 0) & (boxes[:, :3] <= self.patch - 1), axis=1)
        boxes = boxes[inside]
        if self.augment:
            g = CUBE_GROUP[rng.integers(len(CUBE_GROUP))]
            image = g.apply(image)
            boxes[:, :3] = g.apply_points(boxes[:, :3], (self.patch,) * 3)
        if self.scanner is not None:
            image = self.scanner(image, rng)
        targets = assign_anchors(self.grid, boxes)
        padded = np.zeros((MAX_BOXES, 4), dtype=np.float32)
        padded[: min(len(boxes), MAX_BOXES)] = boxes[:MAX_BOXES]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)[None]),
            "labels": torch.from_numpy(targets.labels),
            "deltas": torch.from_numpy(targets.deltas),
            "boxes": torch.from_numpy(padded),
            "n_boxes": torch.tensor(min(len(boxes), MAX_BOXES)),
        }


class UnlabeledPatches(Dataset):
    """``(1, P, P, P)`` crops of unlabeled scans, random or centred on detector candidates;
    augmentation happens in the FocalMix step, where the guessed targets follow it.

    Args:
        scans: the unlabeled scans (cached).
        patch: crop edge ``P``, voxels.
        pad_value: intensity outside a scan.
        seed: sample stream seed.
        candidates: per scan, ``(M_i, 3)`` voxel centres the current detector found
            (:mod:`medssl.training.detection.mining`); None or empty lists: random crops only.
        candidate_fraction: share of crops centred (with jitter: the centre anywhere at least
            ``P/4`` inside the crop) on a candidate of a uniformly chosen scan that has one.

    Item ``i`` is a pure function of ``(seed, i, candidates)``: ``image (1, P, P, P)`` float32,
    ``case ()`` int64, the crop's scan index in ``scans``, and ``start (3,)`` int64, its corner
    in that scan's voxels (CPL object selection keys its memory by them). Without candidates
    the stream is that of the plain random sampler."""

    def __init__(
        self,
        scans: Sequence[CachedVolume],
        patch: int,
        pad_value: float = -1.0,
        seed: int = 0,
        *,
        candidates: Sequence[np.ndarray] | None = None,
        candidate_fraction: float = 0.0,
    ) -> None:
        if not scans:
            raise ValueError("no unlabeled scans")
        if not 0 <= candidate_fraction <= 1:
            raise ValueError(f"candidate_fraction must be in [0, 1], got {candidate_fraction}")
        self.scans, self.patch, self.pad_value, self.seed = list(scans), patch, pad_value, seed
        self.candidates = (
            None if candidates is None else [np.asarray(c, np.float32) for c in candidates]
        )
        self.candidate_fraction = candidate_fraction
        self._with_candidates = (
            _with_centres(self.candidates, len(self.scans), "candidates")
            if candidate_fraction > 0
            else []
        )

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 2, index])
        if self._with_candidates and rng.random() < self.candidate_fraction:
            case = self._with_candidates[rng.integers(len(self._with_candidates))]
            centres = self.candidates[case]  # type: ignore[index]
            start = _start_around(
                rng,
                centres[rng.integers(len(centres))],
                self.scans[case].array.shape,
                self.patch,
                self.patch / 4,
            )
        else:
            case = int(rng.integers(len(self.scans)))
            start = _random_start(rng, self.scans[case].array.shape, self.patch)
        image = extract_window(
            self.scans[case].array, tuple(start), (self.patch,) * 3, self.pad_value
        )
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)[None]),
            "case": torch.tensor(case, dtype=torch.int64),
            "start": torch.as_tensor(start, dtype=torch.int64),
        }
