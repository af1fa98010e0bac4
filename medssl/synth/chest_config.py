"""The chest CT generator's parameters: :class:`ChestConfig` and its named families.

Apart from :mod:`medssl.synth.chest` so that the scanner, anatomy and rendering modules can
take a config without importing the generator that calls them (no import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medssl.synth.nodules import check_shares

__all__ = ["FAMILIES", "FAMILY_SEED_OFFSETS", "SEED_SPAN", "ChestConfig"]


#: Seeds of one family lie in ``[0, SEED_SPAN)``; the generator's random stream starts at
#: ``seed + ChestConfig.seed_offset``, so two families never share a stream.
SEED_SPAN = 1_000_000
#: Each family's seed offset (a multiple of :data:`SEED_SPAN`).
FAMILY_SEED_OFFSETS = {"train": 0, "heldout": SEED_SPAN}


@dataclass(frozen=True)
class ChestConfig:
    """What to generate. Ranges are ``(low, high)``, drawn uniformly per scan unless noted.

    The defaults are the ``"train"`` family; :meth:`for_family` builds a
    family's config (see :data:`FAMILIES` and the module doc).

    Attributes:
        matrix: in-plane rows = columns.
        n_slices: slices; default: cover the lungs plus 10-30 mm above and below.
        family: the parameter family's name (:data:`FAMILIES`); it sets the seed
            offset (:data:`FAMILY_SEED_OFFSETS`), so scans of two families never
            share a random stream, whatever their ranges.
        pixel_spacing_range: in-plane pixel size, mm.
        slice_thickness_range: slice thickness = slice spacing, mm; drawn from the
            thicknesses scanners use (:data:`SLICE_THICKNESSES`) inside the range,
            uniformly if none is.
        n_nodules_range: nodules per scan (inclusive, at most 255).
        nodule_diameter_range: designed diameters (:mod:`medssl.synth.nodules`), mm;
            log-normal, mostly small; capped at half the field of view's shortest side.
        n_confusers_range: micronodules and vessel crossings per scan (inclusive; fewer
            where the field of view has no room for them): excluded findings.
        n_lookalikes_range: calcified granulomas and scars per scan (inclusive; fewer
            where there is no room): not nodules, a mark on one is a false positive
            (:mod:`medssl.synth.nodules`).
        granuloma_share: fraction of the look-alikes that are granulomas (the rest scars).
        noise_sigma_range: image noise standard deviation, HU; the drawn value grows
            with the patient's size (:data:`~medssl.synth.chest_scanner.NOISE_SIZE_POWER`)
            and stays in the range.
        kernel_fwhm_range: reconstruction kernel in-plane FWHM, mm (0.6 sharp, 1.2 soft).
        sharp_kernel_share: fraction of scans reconstructed with an edge-enhancing
            (lung) kernel; the others get a plain Gaussian.
        edge_enhance_range: edge enhancement ``a`` of the sharp kernels
            (:func:`~medssl.synth.primitives.kernel_blur`; overshoot grows with it).
        patient_size_range: linear scale of the patient (1.0 = average adult).
        fat_mm_range: subcutaneous fat at the side of an average-size patient, mm
            (40-60: obese).
        contrast_share: fraction of scans with IV contrast.
        contrast_hu_range: blood attenuation with contrast, HU (heart, mediastinal
            vessels; pulmonary vessels 70-100 % of it).
        motion_share: fraction of scans with breathing motion
            (:func:`~medssl.synth.chest_scanner.with_breathing`).
        motion_amplitude_range: breathing displacement at the lung bases, mm.
        location_shares: probabilities of the nodule locations
            (:data:`~medssl.synth.nodules.LOCATIONS`: free, juxta-pleural, juxta-vascular).
        airway_share: fraction of the juxta-vascular nodules that are peribronchial:
            they abut an airway wall where the airway divides instead of a vessel
            (both lie in the bronchovascular bundle; ``Nodule.attached_to`` says which).
        kind_shares: probabilities of the nodule kinds
            (:data:`~medssl.synth.nodules.NODULE_KINDS`: solid, part-solid, ground-glass).
        full_fov_mm: a field of view at least this wide is centred on the isocentre;
            a narrower one is a targeted reconstruction centred in a lung.
        fov_centre_lps: LPS ``(x, y, z)`` mm overriding the field-of-view centre
            (``z`` used only when ``n_slices`` is given).
        render_threads: threads used to render (0: one per CPU, at most 4). Does
            not change the output.
    """

    matrix: int = 512
    n_slices: int | None = None
    family: str = "train"
    pixel_spacing_range: tuple[float, float] = (0.6, 0.9)
    slice_thickness_range: tuple[float, float] = (0.625, 2.5)
    n_nodules_range: tuple[int, int] = (1, 4)
    nodule_diameter_range: tuple[float, float] = (3.0, 30.0)
    n_confusers_range: tuple[int, int] = (1, 4)
    n_lookalikes_range: tuple[int, int] = (0, 3)
    granuloma_share: float = 0.5
    noise_sigma_range: tuple[float, float] = (10.0, 60.0)
    kernel_fwhm_range: tuple[float, float] = (0.6, 1.2)
    sharp_kernel_share: float = 0.4
    edge_enhance_range: tuple[float, float] = (0.2, 0.7)
    patient_size_range: tuple[float, float] = (0.85, 1.15)
    fat_mm_range: tuple[float, float] = (6.0, 40.0)
    contrast_share: float = 0.3
    contrast_hu_range: tuple[float, float] = (150.0, 350.0)
    motion_share: float = 0.2
    motion_amplitude_range: tuple[float, float] = (1.0, 6.0)
    location_shares: tuple[float, float, float] = (0.45, 0.3, 0.25)
    airway_share: float = 0.25
    kind_shares: tuple[float, float, float] = (0.65, 0.15, 0.2)
    full_fov_mm: float = 250.0
    fov_centre_lps: tuple[float, float, float] | None = None
    render_threads: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {self.family!r}")
        if self.matrix < 16:
            raise ValueError(f"matrix must be at least 16, got {self.matrix}")
        if self.n_slices is not None and self.n_slices < 1:
            raise ValueError(f"n_slices must be positive or None, got {self.n_slices}")
        for name in (
            "pixel_spacing_range",
            "slice_thickness_range",
            "nodule_diameter_range",
            "noise_sigma_range",
            "kernel_fwhm_range",
            "patient_size_range",
            "edge_enhance_range",
            "fat_mm_range",
            "contrast_hu_range",
            "motion_amplitude_range",
        ):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(lo, hi)}")
        for name in ("n_nodules_range", "n_confusers_range", "n_lookalikes_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(
                    f"{name} must be (low, high) with 0 <= low <= high, got {(lo, hi)}"
                )
        for name in (
            "sharp_kernel_share",
            "contrast_share",
            "granuloma_share",
            "motion_share",
            "airway_share",
        ):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(
                    f"{name} must be a probability in [0, 1], got {getattr(self, name)}"
                )
        check_shares("location_shares", self.location_shares)
        check_shares("kind_shares", self.kind_shares)
        if self.n_nodules_range[1] > 255:
            raise ValueError(
                f"n_nodules_range allows at most 255 nodules (uint8 labels), "
                f"got {self.n_nodules_range}"
            )
        if self.nodule_diameter_range[0] < 1.0:
            raise ValueError(
                "nodule_diameter_range must start at 1 mm or more, "
                f"got {self.nodule_diameter_range}"
            )
        if self.render_threads < 0:
            raise ValueError(f"render_threads must be >= 0, got {self.render_threads}")

    @property
    def seed_offset(self) -> int:
        """Added to a case's seed to start its random stream (:data:`FAMILY_SEED_OFFSETS`)."""
        return FAMILY_SEED_OFFSETS[self.family]

    @classmethod
    def for_family(cls, family: str, **overrides: Any) -> ChestConfig:
        """The config of a named family (:data:`FAMILIES`), with ``overrides`` on top.

        Args:
            family: ``"train"`` or ``"heldout"``.
            overrides: any other :class:`ChestConfig` fields (``matrix``, ``n_slices``, ...).

        Raises:
            ValueError: an unknown family, or ``family`` among the overrides.
        """
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
        if "family" in overrides:
            raise ValueError("give the family as the first argument, not among the overrides")
        return cls(family=family, **{**FAMILIES[family], **overrides})


#: The parameter families: the ranges each sets apart from the :class:`ChestConfig`
#: defaults (which are the ``"train"`` family). A detector is trained on ``"train"`` and
#: tested on ``"heldout"``: other pixel sizes and thicker and thinner slices, more noise,
#: softer and sharper kernels with stronger edge enhancement, a wider habitus (more obese
#: patients), more contrast scans, more juxta-pleural / juxta-vascular and subsolid
#: nodules -- and other seeds (:data:`FAMILY_SEED_OFFSETS`).
FAMILIES: dict[str, dict[str, Any]] = {
    "train": {},
    "heldout": {
        "pixel_spacing_range": (0.55, 0.98),
        "slice_thickness_range": (0.6, 3.0),
        "noise_sigma_range": (15.0, 80.0),
        "kernel_fwhm_range": (0.5, 1.4),
        "sharp_kernel_share": 0.5,
        "edge_enhance_range": (0.3, 1.0),
        "patient_size_range": (0.8, 1.25),
        "fat_mm_range": (4.0, 60.0),
        "contrast_share": 0.5,
        "location_shares": (0.35, 0.35, 0.3),
        "airway_share": 0.35,
        "kind_shares": (0.55, 0.2, 0.25),
        "n_lookalikes_range": (0, 4),
        "granuloma_share": 0.6,
        "motion_share": 0.35,
        "motion_amplitude_range": (2.0, 10.0),
    },
}
