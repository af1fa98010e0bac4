"""Detector candidates mined during training, and where training crops are centred on them.

At every validation round the current weights run through the shared pipeline
(:func:`medssl.pipeline.detect.detect_preprocessed`, the inference of validation, scoring and
the gateway) over some training scans; the best candidates become

* **hard negatives** on the labeled scans (``data.hard_negative_fraction``): candidates away
  from every annotated nodule and every excluded finding, i.e. where the current model fires
  falsely. A share of the labeled crops is centred (with jitter) on them, so the focal loss
  sees the model's own false positives as often as they matter — the "negatives sampled where
  the current model fires" of the LUNA16 leaders (DeepLung, NoduleNet: hard negative mining);
* **crop centres** on the unlabeled scans (``focalmix.candidate_fraction``): only a few
  per cent of random crops hold a nodule (issue 18: 3.9 % of 32³ crops), so part of the
  unlabeled crops is centred on what the detector finds there (the paper's unlabeled patches
  come from NLST scans a detector pre-selected, §4.4).

Frames: candidates are voxel centres ``(z, y, x)`` on the cached (model) grid of their scan.
Every list carries a version; a crop is a pure function of ``(seed, index, list)``, so a run
resumed with the list of its last checkpoint continues the same sample stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medssl.pipeline.detect import DetectionParams, DetectionRunner, detect_preprocessed
from medssl.training.cache import CachedVolume

__all__ = ["CandidateLists", "NoduleTruth", "hard_negatives", "refresh_scans", "scan_candidates"]

#: A candidate nearer than this to an annotated or excluded finding's centre (mm, or the
#: finding's diameter if larger) is not a hard negative: the LUNA16 hit radius is half the
#: diameter, and a miss just outside it still overlaps the nodule.
MIN_CLEARANCE_MM = 10.0


def scan_candidates(
    runner: DetectionRunner, volume: CachedVolume, params: DetectionParams, *, top_k: int
) -> np.ndarray:
    """The ``top_k`` best detections of a cached scan.

    Returns:
        ``(M, 4)`` float32 rows ``(z, y, x, probability)``, voxel centres on the cached grid,
        best first, ``M <= top_k``.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    found = detect_preprocessed(volume.to_volume(), runner, params).detections
    rows = sorted(((*d.centre_voxel, d.probability) for d in found), key=lambda r: -r[3])[:top_k]
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4)


def _near(
    points: np.ndarray, findings: np.ndarray, spacing_mm: float, clearance_mm: float
) -> np.ndarray:
    """``(M,)`` bool: a point lies within ``max(clearance, diameter)`` of a finding ``(z, y, x, d)``
    (voxels; ``d`` in voxels)."""
    if not len(points) or not len(findings):
        return np.zeros(len(points), dtype=bool)
    distance = np.linalg.norm(points[:, None, :3] - findings[None, :, :3], axis=2) * spacing_mm
    reach = np.maximum(findings[:, 3] * spacing_mm, clearance_mm)
    return np.any(distance < reach[None, :], axis=1)


def hard_negatives(
    candidates: np.ndarray,
    nodules: np.ndarray,
    excluded: np.ndarray,
    *,
    spacing_mm: float,
    clearance_mm: float = MIN_CLEARANCE_MM,
) -> np.ndarray:
    """The candidates that are false positives away from every finding.

    Args:
        candidates: ``(M, 4)`` from :func:`scan_candidates`.
        nodules, excluded: ``(K, 4)`` cubes ``(z, y, x, d)`` on the same grid, voxels.
        spacing_mm: the grid's isotropic spacing.
        clearance_mm: the smallest distance kept from a finding's centre (or its diameter if
            larger).

    Returns:
        ``(M', 3)`` float32 voxel centres ``(z, y, x)``, best first.
    """
    near = _near(candidates, nodules, spacing_mm, clearance_mm) | _near(
        candidates, excluded, spacing_mm, clearance_mm
    )
    return np.ascontiguousarray(candidates[~near, :3], dtype=np.float32)


def refresh_scans(n_scans: int, per_round: int, round_index: int) -> list[int]:
    """The scans mined at round ``round_index`` (0, 1, ...): ``per_round`` of ``n_scans`` in turn
    (round-robin), all of them when ``per_round`` is 0 or at least ``n_scans``."""
    if per_round <= 0 or per_round >= n_scans:
        return list(range(n_scans))
    first = round_index * per_round
    return [(first + i) % n_scans for i in range(per_round)]


@dataclass
class CandidateLists:
    """Per scan, the voxel centres ``(M_i, 3)`` crops may be centred on, and the list's version
    (0: never mined; each refresh adds 1)."""

    centres: list[np.ndarray]
    version: int = 0

    @classmethod
    def empty(cls, n_scans: int) -> CandidateLists:
        return cls([np.zeros((0, 3), dtype=np.float32) for _ in range(n_scans)])

    def replace(self, updates: Mapping[int, np.ndarray]) -> CandidateLists:
        """A new version with the lists of the scans in ``updates`` replaced."""
        centres = list(self.centres)
        for i, c in updates.items():
            centres[i] = np.ascontiguousarray(np.asarray(c, dtype=np.float32).reshape(-1, 3))
        return CandidateLists(centres, self.version + 1)

    def state_dict(self) -> dict[str, Any]:
        """Plain lists, for checkpoints."""
        return {"version": self.version, "centres": [c.tolist() for c in self.centres]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], n_scans: int) -> CandidateLists:
        """Inverse of :meth:`state_dict`; ``ValueError`` if it is for another number of scans."""
        centres = [np.asarray(c, dtype=np.float32).reshape(-1, 3) for c in state["centres"]]
        if len(centres) != n_scans:
            raise ValueError(
                f"the checkpoint's candidate lists cover {len(centres)} scans, this run has "
                f"{n_scans}"
            )
        return cls(centres, int(state["version"]))


class NoduleTruth:
    """Hidden nodule positions of unlabeled scans, for diagnostics only (pseudo-label precision);
    never a training signal.

    Args:
        nodules: per unlabeled scan (the trainer's order), cubes ``(K, 4)`` ``(z, y, x, d)`` on
            its cached grid, voxels; None where the truth of that scan is unknown.
    """

    def __init__(self, nodules: Sequence[np.ndarray | None]) -> None:
        self.nodules = [
            None if n is None else np.asarray(n, dtype=np.float64).reshape(-1, 4) for n in nodules
        ]

    def knows(self, case: int) -> bool:
        """Whether the truth of scan ``case`` is known."""
        return self.nodules[case] is not None

    def hits(self, case: int, centres: np.ndarray) -> np.ndarray:
        """``(M,)`` bool: each voxel centre ``(z, y, x)`` of scan ``case`` lies on a true nodule
        (within its radius, LUNA16's hit rule). ``ValueError`` where the truth is unknown."""
        truth = self.nodules[case]
        if truth is None:
            raise ValueError(f"the truth of unlabeled scan {case} is unknown (check knows() first)")
        points = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
        if not len(points) or not len(truth):
            return np.zeros(len(points), dtype=bool)
        distance = np.linalg.norm(points[:, None, :] - truth[None, :, :3], axis=2)
        return np.any(distance <= truth[None, :, 3] / 2, axis=1)

    def precision(self, centres: Mapping[int, np.ndarray]) -> tuple[int, int]:
        """``(hits, total)`` over the centres ``{case: (M, 3)}`` of the scans whose truth is
        known."""
        hits = total = 0
        for case, points in centres.items():
            if self.knows(case):
                found = self.hits(case, points)
                hits, total = hits + int(found.sum()), total + len(found)
        return hits, total
