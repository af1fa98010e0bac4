"""A synthetic multi-organ abdominal phantom (Synapse-like) in several imaging domains.

``generate_organ_phantom(seed, domain)`` returns an image and a label map on
the same grid. The anatomy (body wall, spine, ribs, lungs, bowel and eleven
labelled organs from the liver down to the adrenal glands, see
:data:`LABELS`) comes from the seed alone; the domain decides the modality,
contrast, artefacts and sampling grid. The same seed in two domains is
therefore the same subject, in the same place in patient space.

Grid: axial, the default direction of :func:`medssl.volume.affine_from_geometry`
(index ``z`` -> superior, ``y`` -> posterior, ``x`` -> patient left); its
centre sits at LPS ``(x, y, z) = (0, 0, -200) mm`` plus the domain's
``fov_centre_mm``, so the origin is about ``-FOV / 2`` in x and y.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from medssl.synth.domains import DOMAINS, Domain, render_image

#: The domain-randomised pseudo-domain (:mod:`medssl.synth.randomise`; ``--domain rand``).
RANDOMISED = "rand"
from medssl.synth.organ_anatomy import sample_anatomy
from medssl.synth.organ_raster import rasterise
from medssl.synth.organ_scene import LABELS
from medssl.synth.primitives import physical_grid
from medssl.volume import Volume, affine_from_geometry

__all__ = ["DOMAINS", "LABELS", "RANDOMISED", "Domain", "OrganCase", "domain_modality", "generate_organ_phantom",
           "organ_grid"]

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
    return "CT" if name == RANDOMISED else _resolve(name).modality


def _resolve(domain: Domain | str) -> Domain:
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
    dom = _resolve(domain)
    shape = dom.shape if shape is None else tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive ints (Z, Y, X), got {shape}")
    centre = np.asarray(dom.fov_centre_mm, dtype=np.float64)
    z, y, x = (a.ravel().astype(np.float64) for a in physical_grid(shape, dom.spacing, -centre))
    origin = _BODY_CENTRE_LPS + [x[0], y[0], z[0]]
    return affine_from_geometry(origin, dom.spacing), (z, y, x)


def generate_organ_phantom(
    seed: int, domain: Domain | str = "A", shape: tuple[int, int, int] | None = None
) -> OrganCase:
    """A synthetic abdominal scan and its organ labels.

    Args:
        seed: non-negative subject seed; fixes the anatomy and, with the domain
            name, the noise and bias draws.
        domain: a :class:`Domain` or a preset name (``"A"``-``"D"``, ``"ct"``, ``"mr"``), or
            ``"rand"``: SynthSeg-style domain randomisation, every case its own contrast,
            noise, blur, resolution, bias, body size, shape deformation and FOV
            (:mod:`medssl.synth.randomise`).
        shape: grid ``(Z, Y, X)`` overriding the domain's (spacing stays the domain's,
            so the field of view changes).

    Returns:
        An :class:`OrganCase`.
    """
    if isinstance(domain, str) and domain == RANDOMISED:
        if shape is not None:
            raise ValueError(f"domain {RANDOMISED!r} draws its own grid per case; shape cannot be set")
        from medssl.synth.randomise import randomised_organ_phantom

        return randomised_organ_phantom(seed)
    dom = _resolve(domain)
    affine, axes = organ_grid(dom, shape)
    canvas = rasterise(sample_anatomy(seed), axes)
    rng = np.random.default_rng([seed, 1, zlib.crc32(dom.name.encode())])
    image = render_image(canvas.tissue, dom, rng)
    meta = {"seed": seed, "domain": dom.name, "modality": dom.modality}
    return OrganCase(
        image=Volume(image, affine, dict(meta)),
        label=Volume(canvas.label, affine.copy(), {**meta, "labels": dict(LABELS)}),
        domain=dom,
    )
