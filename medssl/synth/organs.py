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

import numpy as np

from medssl.synth.domains import DOMAINS, Domain, render_image
from medssl.synth.organ_anatomy import sample_anatomy
from medssl.synth.organ_case import (
    RANDOMISED,
    OrganCase,
    domain_modality,
    organ_grid,
    resolve_domain,
)
from medssl.synth.organ_raster import rasterise
from medssl.synth.organ_scene import LABELS
from medssl.volume import Volume

__all__ = [
    "DOMAINS",
    "LABELS",
    "RANDOMISED",
    "Domain",
    "OrganCase",
    "domain_modality",
    "generate_organ_phantom",
    "organ_grid",
]


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
            raise ValueError(
                f"domain {RANDOMISED!r} draws its own grid per case; shape cannot be set"
            )
        from medssl.synth.randomise import randomised_organ_phantom

        return randomised_organ_phantom(seed)
    dom = resolve_domain(domain)
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
