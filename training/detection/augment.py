"""Scanner augmentation for detector training: the same anatomy as another scanner and protocol
would have reconstructed it.

A detector trained on one set of scanners meets others: more or less noise, softer or sharper
reconstruction kernels, thicker slices. Those are the ranges in which our generator's held-out
family differs from its training family (:data:`medssl.synth.chest.FAMILIES`), and the ranges
real archives span (NLST: 1-3.2 mm slices, soft to bone kernels, low dose). nnU-Net's default
augmentation for CT draws Gaussian noise, Gaussian blur and a low-resolution simulation for the
same reason (Isensee et al., Nature Methods 2021, Supplementary Note 4); we keep the three
physical ones and replace nnU-Net's photometric ones (brightness, contrast, gamma), which break
the calibrated HU scale a CT detector relies on, with an edge-enhancing (sharp) kernel.

Each labeled crop is augmented with probability ``p``; it then gets each of the three
operations independently with the probabilities below, in the order a scanner applies them:
kernel (blur *or* sharpen), slice thickness (blur along z), noise.

=================  ===========  ===================================================================
operation          probability  parameters (voxels of the 1 mm model grid, HU)
=================  ===========  ===================================================================
soft kernel        0.35         Gaussian blur, in-plane sigma U(0.3, 0.8)
sharp kernel       0.35         unsharp mask ``x + a (x - G_1(x))``, amount a U(0.2, 0.8)
thick slices       0.3          Gaussian blur along z, sigma U(0.4, 1.3) (about 1-3 mm FWHM)
noise              0.5          additive Gaussian, sigma U(5, 40) HU, correlated over ~1 voxel
                                (the noise texture of a filtered back-projection)
=================  ===========  ===================================================================

The operations act on the normalised crop (the lung window on ``[-1, 1]``,
:class:`medssl.pipeline.Intensity`), and the result is clipped back to that range. They change
intensities only, so box targets are unchanged. TorchIO-style: :meth:`ScannerAugment.sample`
draws a :class:`ScannerParams` from a ``np.random.Generator``, :func:`apply_scanner` is the
pure function of the crop and the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["ScannerAugment", "ScannerParams", "apply_scanner"]

#: ``(probability, low, high)`` of each operation (see the module table).
SOFT_KERNEL = (0.35, 0.3, 0.8)
SHARP_KERNEL = (0.35, 0.2, 0.8)
THICK_SLICES = (0.3, 0.4, 1.3)
NOISE_HU = (0.5, 5.0, 40.0)
#: Correlation length of the added noise, voxels (Gaussian sigma; the noise is rescaled to its
#: drawn standard deviation after smoothing).
NOISE_CORRELATION = 0.6
#: Sigma of the unsharp mask's blur, voxels.
SHARP_SIGMA = 1.0


@dataclass(frozen=True)
class ScannerParams:
    """One draw of scanner augmentation; None = operation not applied.

    Attributes:
        blur_sigma: in-plane Gaussian sigma of a soft kernel, voxels.
        sharpen: amount of an edge-enhancing kernel (unsharp mask).
        z_sigma: Gaussian sigma along z (axis 0) of thicker slices, voxels.
        noise_hu: standard deviation of the added noise, HU.
        noise_seed: seed of the noise field.
    """

    blur_sigma: float | None = None
    sharpen: float | None = None
    z_sigma: float | None = None
    noise_hu: float | None = None
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if self.blur_sigma is not None and self.sharpen is not None:
            raise ValueError("a kernel is soft or sharp, not both")


class ScannerAugment:
    """Draws :class:`ScannerParams`.

    Args:
        p: probability that a crop is augmented at all (0: never, the draw consumes nothing).
        hu_range: ``hu_max - hu_min`` of the intensity window the crops are normalised with, HU
            (noise is drawn in HU and scaled to the ``[-1, 1]`` window).
    """

    def __init__(self, p: float, hu_range: float) -> None:
        if not 0 <= p <= 1 or hu_range <= 0:
            raise ValueError(f"need 0 <= p <= 1 and hu_range > 0, got {p}, {hu_range}")
        self.p, self.hu_range = p, hu_range

    def sample(self, rng: np.random.Generator) -> ScannerParams:
        """One draw (no draw at all, and no parameters, when ``p`` is 0)."""
        if self.p == 0 or rng.random() >= self.p:
            return ScannerParams()
        kernel = rng.random()
        blur = float(rng.uniform(*SOFT_KERNEL[1:])) if kernel < SOFT_KERNEL[0] else None
        sharp = (
            float(rng.uniform(*SHARP_KERNEL[1:]))
            if SOFT_KERNEL[0] <= kernel < SOFT_KERNEL[0] + SHARP_KERNEL[0]
            else None
        )
        z = float(rng.uniform(*THICK_SLICES[1:])) if rng.random() < THICK_SLICES[0] else None
        noise = float(rng.uniform(*NOISE_HU[1:])) if rng.random() < NOISE_HU[0] else None
        return ScannerParams(blur, sharp, z, noise, int(rng.integers(2**31)))

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return apply_scanner(image, self.sample(rng), self.hu_range)

    def __repr__(self) -> str:
        return f"ScannerAugment(p={self.p}, hu_range={self.hu_range})"


def apply_scanner(image: np.ndarray, params: ScannerParams, hu_range: float) -> np.ndarray:
    """Apply one draw to a crop.

    Args:
        image: ``(Z, Y, X)`` float32 crop normalised to ``[-1, 1]`` (axis 0 is z, the slice axis).
        params: the draw.
        hu_range: width of the normalisation window, HU (``2 / hu_range`` units per HU).

    Returns:
        float32 ``(Z, Y, X)`` clipped to ``[-1, 1]``; ``image`` itself when nothing applies.
    """
    if image.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) crop, got shape {image.shape}")
    if all(v is None for v in (params.blur_sigma, params.sharpen, params.z_sigma, params.noise_hu)):
        return image
    out = image.astype(np.float32, copy=True)
    if params.blur_sigma is not None:
        out = ndimage.gaussian_filter(
            out, (0.0, params.blur_sigma, params.blur_sigma), mode="nearest"
        )
    if params.sharpen is not None:
        out = out + params.sharpen * (
            out - ndimage.gaussian_filter(out, SHARP_SIGMA, mode="nearest")
        )
    if params.z_sigma is not None:
        out = ndimage.gaussian_filter1d(out, params.z_sigma, axis=0, mode="nearest")
    if params.noise_hu is not None:
        noise = (
            np.random.default_rng(params.noise_seed).standard_normal(out.shape).astype(np.float32)
        )
        noise = ndimage.gaussian_filter(noise, NOISE_CORRELATION, mode="wrap")
        noise *= params.noise_hu * (2.0 / hu_range) / max(float(noise.std()), 1e-6)
        out = out + noise
    return np.clip(out, -1.0, 1.0).astype(np.float32, copy=False)
