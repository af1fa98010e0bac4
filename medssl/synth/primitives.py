"""Building blocks shared by the synthetic phantoms.

All functions work on arrays indexed ``(z, y, x)``. Physical sizes are in mm and
are turned into voxels with the grid's ``spacing`` ``(sz, sy, sx)``. Random
draws come only from the ``numpy.random.Generator`` passed in, so a phantom is
a pure function of its seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "ellipsoid_distance",
    "kernel_blur",
    "kernel_reach_mm",
    "physical_grid",
    "scanner_noise",
    "smooth_random_field",
]


def physical_grid(
    shape: Sequence[int],
    spacing: Sequence[float],
    centre_mm: Sequence[float] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Open (broadcastable) coordinate arrays in mm, centred on the volume.

    Args:
        shape: grid shape ``(Z, Y, X)``.
        spacing: voxel size ``(sz, sy, sx)`` in mm.
        centre_mm: the mm position, in the same centred frame, that becomes 0;
            default 0 (the grid centre).

    Returns:
        ``(z, y, x)`` float32 arrays of shapes ``(Z,1,1)``, ``(1,Y,1)``, ``(1,1,X)``.
    """
    centre = np.zeros(3) if centre_mm is None else np.asarray(centre_mm, dtype=np.float64)
    axes = []
    for k, (n, s) in enumerate(zip(shape, spacing)):
        coords = (np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(s)
        coords = coords - np.float32(centre[k])
        view = [1, 1, 1]
        view[k] = n
        axes.append(coords.reshape(view))
    return axes[0], axes[1], axes[2]


def smooth_random_field(
    shape: Sequence[int],
    correlation_vox: float | Sequence[float],
    rng: np.random.Generator,
    downsample: int = 4,
) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with a given correlation length.

    The field is drawn on a grid ``downsample`` times coarser, smoothed there
    and upsampled linearly, which keeps it cheap for large volumes.

    Args:
        shape: output shape ``(Z, Y, X)``.
        correlation_vox: Gaussian smoothing sigma in output voxels, per axis or one value.
        rng: the random generator.
        downsample: coarsening factor of the drawing grid (>= 1).

    Returns:
        float32 array of ``shape``.
    """
    sigma = np.broadcast_to(np.asarray(correlation_vox, dtype=np.float64), (3,))
    factor = np.maximum(1, np.minimum(downsample, np.floor(sigma).astype(int)))
    coarse_shape = tuple(int(np.ceil(n / f)) + 1 for n, f in zip(shape, factor))
    coarse = rng.standard_normal(coarse_shape, dtype=np.float32)
    coarse = ndimage.gaussian_filter(coarse, sigma / factor, mode="wrap")
    coarse -= coarse.mean()  # long correlations leave a finite grid with a non-zero mean
    coarse /= max(float(coarse.std()), 1e-6)
    zoom = [c / n for c, n in zip((np.asarray(coarse_shape) - 1), shape)]
    coords = np.meshgrid(
        *[np.arange(n, dtype=np.float32) * z for n, z in zip(shape, zoom)],
        indexing="ij",
        sparse=True,
    )
    # Separable linear upsampling: interpolate one axis at a time.
    out = coarse
    for axis, c in enumerate(coords):
        c = c.ravel()
        i0 = np.clip(np.floor(c).astype(int), 0, out.shape[axis] - 2)
        w = (c - i0).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i0 + 1, axis=axis) * w
    return out.astype(np.float32, copy=False)


def ellipsoid_distance(
    z: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    centre: Sequence[float],
    radii: Sequence[float],
) -> np.ndarray:
    """Normalised ellipsoid distance ``sum(((p - c) / r)^2)``; < 1 inside.

    Args:
        z, y, x: broadcastable coordinate arrays in mm (from :func:`physical_grid`).
        centre: ellipsoid centre ``(z, y, x)`` in mm.
        radii: semi-axes ``(rz, ry, rx)`` in mm, aligned with the grid axes.

    Returns:
        float32 array of the broadcast shape.
    """
    return (
        ((z - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((x - centre[2]) / radii[2]) ** 2
    ).astype(np.float32, copy=False)


def kernel_blur(
    image: np.ndarray, fwhm_mm: float, spacing: Sequence[float], *, edge_enhance: float = 0.0
) -> np.ndarray:
    """Apply a reconstruction kernel's in-plane point-spread function.

    The PSF is a Gaussian of ``fwhm_mm`` (``G``); a sharp lung kernel also
    enhances edges: ``(1 + a) G - a G2``, with ``G2`` the Gaussian of twice
    the width and ``a = edge_enhance``. Its transfer function rises above 1 at
    middle frequencies, so edges overshoot (a dark rim outside a bright
    structure, a bright one inside), as with B60f/LUNG/YA-type kernels; the
    mean (DC) is kept. ``a = 0`` is a plain Gaussian (a soft kernel).

    Args:
        image: array ``(Z, Y, X)``.
        fwhm_mm: in-plane full width at half maximum in mm (soft kernel ~1.2,
            sharp ~0.6). Along z the slice thickness already blurs, so z is left alone.
        spacing: ``(sz, sy, sx)`` in mm.
        edge_enhance: ``a >= 0``, the weight of the edge enhancement.

    Returns:
        float array of ``image``'s shape.
    """
    if edge_enhance < 0:
        raise ValueError(f"edge_enhance must be >= 0, got {edge_enhance}")
    sigma_mm = fwhm_mm / 2.3548
    sigma = (0.0, sigma_mm / spacing[1], sigma_mm / spacing[2])
    blurred = ndimage.gaussian_filter(image, sigma, mode="nearest")
    if edge_enhance == 0:
        return blurred
    # G2 = G (*) G_{sqrt(3) sigma}: the wide blur from the narrow one
    wide = ndimage.gaussian_filter(
        blurred, (0.0, 3**0.5 * sigma[1], 3**0.5 * sigma[2]), mode="nearest"
    )
    wide *= np.asarray(-edge_enhance, dtype=wide.dtype)
    blurred *= np.asarray(1.0 + edge_enhance, dtype=blurred.dtype)
    blurred += wide
    return blurred


def kernel_reach_mm(fwhm_mm: float, edge_enhance: float = 0.0) -> float:
    """How far (mm) :func:`kernel_blur` spreads a point: 4 sigma of its widest Gaussian."""
    return 4.0 * fwhm_mm / 2.3548 * (2.0 if edge_enhance > 0 else 1.0)


def scanner_noise(
    shape: Sequence[int], sigma_hu: float, rng: np.random.Generator, *, edge_enhance: float = 0.0
) -> np.ndarray:
    """CT-like noise: white noise given the fine in-plane texture of filtered back-projection.

    The noise is correlated in-plane over about one voxel (``sigma`` 0.6 voxel);
    a sharp kernel (``edge_enhance = a > 0``) boosts its higher frequencies the
    way :func:`kernel_blur` boosts edges (``(1 + a) n - a G_{1.2 vox} n``), so
    the grain is finer. It is then rescaled to the requested standard deviation.

    Args:
        shape: ``(Z, Y, X)``.
        sigma_hu: standard deviation in HU.
        rng: the random generator.
        edge_enhance: ``a >= 0``, as in :func:`kernel_blur`.

    Returns:
        float32 array of ``shape``.
    """
    if edge_enhance < 0:
        raise ValueError(f"edge_enhance must be >= 0, got {edge_enhance}")
    noise = rng.standard_normal(tuple(shape), dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, (0.0, 0.6, 0.6), mode="wrap")
    if edge_enhance > 0:
        wide = ndimage.gaussian_filter(noise, (0.0, 1.2, 1.2), mode="wrap")
        noise *= np.float32(1.0 + edge_enhance)
        noise -= np.float32(edge_enhance) * wide
    noise *= np.float32(sigma_hu / max(float(noise.std()), 1e-6))
    return noise
