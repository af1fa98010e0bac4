"""One synthetic abdominal subject seen by one domain: :class:`OrganCase` and the domain's
sampling grid (:func:`organ_grid`).

Apart from :mod:`medssl.synth.organs` so that the domain randomisation
(:mod:`medssl.synth.randomise`), which :func:`~medssl.synth.organs.generate_organ_phantom`
calls for ``domain="rand"``, can build cases without importing it (no import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medssl.synth.domains import DOMAINS, Domain
from medssl.synth.primitives import physical_grid
from medssl.volume import Volume, affine_from_geometry

__all__ = ["RANDOMISED", "OrganCase", "domain_modality", "organ_grid", "resolve_domain"]

#: The domain-randomised pseudo-domain (:mod:`medssl.synth.randomise`; ``--domain rand``).
RANDOMISED = "rand"

_BODY_CENTRE_LPS = np.array([0.0, 0.0, -200.0])  # (x, y, z) mm


@dataclass
class OrganCase:
    """One synthetic subject seen by one domain.

    Attributes:
        image: float32 ``(Z, Y, X)``; HU for CT domains, arbitrary units for MR.
            ``meta`` holds ``seed``, ``domain`` and ``modality``.
        label: uint8 label map on the same grid, codes of :data:`LABELS`, 0 background.
        domain: the domain that produced the image.
    """

    image: Volume
    label: Volume
    domain: Domain


def domain_modality(name: str) -> str:
    """``"CT"`` or ``"MR"``: the modality of a preset domain or of ``"rand"`` (CT)."""
    return "CT" if name == RANDOMISED else resolve_domain(name).modality


def resolve_domain(domain: Domain | str) -> Domain:
    """A :class:`Domain`, or the preset of that name (ValueError naming the choices)."""
    if isinstance(domain, Domain):
        return domain
    if domain not in DOMAINS:
        raise ValueError(
            f"unknown domain {domain!r}; choose one of {sorted(DOMAINS)} or pass a Domain"
        )
    return DOMAINS[domain]


def organ_grid(
    domain: Domain | str, shape: tuple[int, int, int] | None = None
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The sampling grid of a domain.

    Args:
        domain: a :class:`Domain` or the name of a preset.
        shape: grid ``(Z, Y, X)``; default the domain's. The spacing is always the domain's.

    Returns:
        ``(affine, axes)``: the 4x4 index ``(z, y, x)`` -> LPS affine, and the
        voxel-centre coordinates ``(z, y, x)`` in mm as 1-D arrays in the frame
        :func:`medssl.synth.organ_raster.rasterise` expects (body centre at 0).
    """
    dom = resolve_domain(domain)
    dims: tuple[int, ...] = dom.shape if shape is None else tuple(int(n) for n in shape)
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"shape must be three positive ints (Z, Y, X), got {dims}")
    centre = np.asarray(dom.fov_centre_mm, dtype=np.float64)
    z, y, x = (a.ravel().astype(np.float64) for a in physical_grid(dims, dom.spacing, -centre))
    origin = _BODY_CENTRE_LPS + np.array([x[0], y[0], z[0]])
    return affine_from_geometry(origin, dom.spacing), (z, y, x)
