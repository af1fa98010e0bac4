"""The vocabulary of the organ phantom: tissues, labels, shapes and painting strokes.

An :class:`Anatomy` is a subject written in this vocabulary: a :class:`Trunk`
(body wall, spine, ribs, diaphragm) and a list of :class:`Stroke` s painted in
order. Everything is physical: positions and sizes in mm in the *anatomy
frame* (``z`` superior, ``y`` posterior, ``x`` patient-left, origin near the L1
vertebra on the body axis), never voxels.
:func:`medssl.synth.organ_anatomy.sample_anatomy` draws one from a seed,
:func:`medssl.synth.organ_raster.rasterise` paints it onto a grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

import numpy as np

from medssl.synth.shapes import Canvas, LatticeField, Window, blob_masks, tube_masks

__all__ = [
    "FAT_ONLY",
    "LABELS",
    "ORGAN_ONTO",
    "Anatomy",
    "Blob",
    "Clip",
    "Region",
    "Stroke",
    "Tissue",
    "Trunk",
    "Tube",
]

LABELS: dict[int, str] = {
    1: "liver",
    2: "spleen",
    3: "left_kidney",
    4: "right_kidney",
    5: "aorta",
    6: "inferior_vena_cava",
    7: "stomach",
    8: "gallbladder",
    9: "pancreas",
    10: "left_adrenal_gland",
    11: "right_adrenal_gland",
}
"""Label code -> structure name; 0 is background (everything unlabelled)."""

LIVER, SPLEEN, LEFT_KIDNEY, RIGHT_KIDNEY, AORTA, IVC, STOMACH = 1, 2, 3, 4, 5, 6, 7
GALLBLADDER, PANCREAS, LEFT_ADRENAL, RIGHT_ADRENAL = 8, 9, 10, 11


class Tissue(IntEnum):
    """Tissue classes of the phantom; a domain maps each to an intensity."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    BONE = 3  # cortical bone
    MARROW = 4  # cancellous bone
    DISC = 5
    CSF = 6
    LUNG = 7
    HEART = 8
    BOWEL = 9  # small-bowel loops and the colon wall
    COLON_CONTENT = 10
    GAS = 11
    VESSEL = 12  # unlabelled veins and arteries (portal, hepatic, renal, iliac)
    LIVER = 13
    SPLEEN = 14
    KIDNEY = 15
    AORTA = 16
    IVC = 17
    STOMACH_WALL = 18
    STOMACH_CONTENT = 19
    GALLBLADDER = 20
    PANCREAS = 21
    ADRENAL = 22


Region = Literal["inner", "cavity", "abdomen", "thorax"]
"""Where a stroke may paint: inside the subcutaneous fat, inside the muscle
wall, the part of that below the diaphragm, or above it."""


@dataclass(frozen=True)
class Blob:
    """A lobulated ellipsoid (see :func:`medssl.synth.shapes.blob_masks`), mm."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    rot: np.ndarray
    field: LatticeField
    amplitude: float

    def masks(self, canvas: Canvas) -> Iterator[tuple[Window, np.ndarray]]:
        """Yield ``(window, mask)`` pairs on ``canvas``."""
        return blob_masks(canvas, self.centre, self.radii, self.rot, self.field, self.amplitude)


@dataclass(frozen=True)
class Tube:
    """A tube along a polyline ``points (n, 3)`` mm with radii ``(n,)`` mm."""

    points: np.ndarray
    radii: np.ndarray

    def masks(self, canvas: Canvas) -> Iterator[tuple[Window, np.ndarray]]:
        """Yield ``(window, mask)`` pairs on ``canvas``."""
        return tube_masks(canvas, self.points, self.radii)

    def thinner(self, by_mm: float) -> Tube:
        """The lumen of this tube inside a wall ``by_mm`` thick."""
        return Tube(self.points, np.maximum(self.radii - by_mm, 0.5))


@dataclass(frozen=True)
class Clip:
    """An extra condition on a stroke: anterior of a coronal plane, or a field above a threshold.

    Attributes:
        anterior_of: keep ``y < anterior_of`` (mm); gas floats anteriorly in a supine patient.
        field, above: keep ``field > above``.
    """

    anterior_of: float | None = None
    field: LatticeField | None = None
    above: float = 0.0

    def mask(self, win: Window) -> np.ndarray:
        """Bool array broadcastable to the window's shape."""
        keep = np.ones((1, 1, 1), dtype=bool)
        if self.anterior_of is not None:
            keep = keep & (win.y < self.anterior_of)
        if self.field is not None:
            keep = keep & (self.field.sample(*win.axes) > self.above)
        return keep


@dataclass(frozen=True)
class Stroke:
    """One painting step: a shape, the tissue and label it writes, and where it may write.

    Attributes:
        shape: a :class:`Blob` or :class:`Tube`.
        tissue, label: what to write (label 0 for unlabelled structures).
        region: the body compartment it is confined to.
        onto: tissues it may overwrite.
        clip: an optional extra condition.
    """

    shape: Blob | Tube
    tissue: Tissue
    label: int
    region: Region
    onto: frozenset[Tissue]
    clip: Clip | None = None


@dataclass(frozen=True)
class Trunk:
    """Body wall, spine, ribs and diaphragm; lengths in mm.

    The abdominal cavity's cross-section is an egg-shaped ellipse: semi-axis
    ``ax`` left-right, ``ay_ant`` / ``ay_post`` towards the front / back. Around
    it lie the muscle wall, ``wall`` thick, and subcutaneous fat,
    ``fat = (anterior, lateral, posterior)`` thick. ``taper`` widens the
    cross-section towards the ribs (relative, per 100 mm of ``z``); ``field``
    and ``amplitude`` make the outline irregular.
    """

    ax: float
    ay_ant: float
    ay_post: float
    fat: tuple[float, float, float]
    wall: float
    taper: float
    field: LatticeField
    amplitude: float
    spine_y: float  # centre of the vertebral bodies
    spine_curve: float  # lordosis: posterior shift of the spine per (100 mm)^2 of z
    disc_phase: float
    rib_phase: float
    domes: tuple[tuple[float, float, float], tuple[float, float, float]]  # (z, y, x) right, left


@dataclass(frozen=True)
class Anatomy:
    """A subject: trunk, then strokes painted in order (later strokes win).

    Attributes:
        seed: the seed it was drawn from.
        offset: where the anatomy frame origin sits in the scanner frame, ``(z, y, x)`` mm.
        trunk: body wall, spine, ribs and diaphragm.
        muscles: paraspinal and psoas muscles, painted before the skeleton.
        viscera: organs, vessels, bowel and heart, painted after the skeleton.
    """

    seed: int
    offset: tuple[float, float, float]
    trunk: Trunk
    muscles: tuple[Stroke, ...]
    viscera: tuple[Stroke, ...]


_SOFT = frozenset({Tissue.FAT, Tissue.BOWEL, Tissue.COLON_CONTENT, Tissue.GAS, Tissue.VESSEL})
_ORGANS = frozenset(
    {
        Tissue.LIVER,
        Tissue.SPLEEN,
        Tissue.KIDNEY,
        Tissue.AORTA,
        Tissue.IVC,
        Tissue.STOMACH_WALL,
        Tissue.STOMACH_CONTENT,
        Tissue.GALLBLADDER,
        Tissue.PANCREAS,
        Tissue.ADRENAL,
    }
)
ORGAN_ONTO = _SOFT | _ORGANS
"""What an organ may overwrite: fat, bowel, vessels and earlier organs, never muscle or bone."""
FAT_ONLY = frozenset({Tissue.FAT})
