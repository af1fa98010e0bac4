"""Synapse-Variant Data Augmentation (SVDA) of A&D (Wang & Li, NeurIPS 2023, §3.1).

After a random crop (done by the caller), ``n_ops = 3`` of six transforms are sampled without
replacement and each is applied with probability ``p = 0.7``: in-plane rotation, zoom, Gaussian
blur, multiplicative brightness, contrast and gamma. The official code is
``code/data/StrongAug.py`` (``get_StrongAug``, ``RandomSelect``, ``augment_rotation``,
``augment_scale``) built on batchgenerators (``augmentations/color_augmentations.py``:
``augment_contrast``, ``augment_gamma``, ``augment_brightness_multiplicative``;
``augmentations/noise_augmentations.py``: ``augment_gaussian_blur``; ``augmentations/utils.py``:
``rotate_coords_3d``, ``scale_coords``, ``interpolate_img``). Numpy + scipy only, so it runs in
DataLoader workers.

TorchIO-style split: :meth:`SVDA.sample` draws an :class:`SVDAParams` from a
``np.random.Generator`` (independent of the image); :func:`apply_svda` is the pure array function.

Choices (each marked where it is made):

* Order: spatial ops first (rotation and zoom fused into one resampling), then blur, brightness,
  contrast, gamma — the order of the official ``tr_transforms_select`` list. The official
  ``RandomSelect`` inserts the sampled ops in random order; we fix it so that parameters alone
  determine the output.
* Rotation is about the z axis (in the (y, x) plane): the official ``augment_rotation`` passes one
  angle to ``rotate_coords_3d`` as ``angle_x`` with the other two 0, i.e. a rotation that keeps the
  first array axis fixed; for ``(Z, Y, X)`` axial patches that axis is z.
* Zoom follows ``scale_coords``: the zero-centred *sampling* coordinates are multiplied by ``s``,
  so ``s < 1`` reads a smaller region and the content appears *larger* (zoom in).
* Interpolation: image spline order 3 as the official (``order_data=3``; ``image_order=1`` is
  ~4x faster, e.g. 0.27 s instead of 1.15 s for a 96x160x160 patch on one core); label order 0
  (nearest). The official interpolates labels with ``order_seg=1`` one-hot per label and
  thresholds at 0.5 (``interpolate_img(is_seg=True)``); nearest keeps the label set without one
  resampling per class.
* Border: constant. Image: ``pad_value`` or, when None, the patch minimum (the official pads with
  0, the minimum of its [0, 1]-normalised volumes; our patches may still be in HU). Label: 0.
* Draws: rotation, blur sigma and brightness are uniform over their ranges; zoom, contrast and
  gamma use batchgenerators' two-sided draw (with probability 1/2 uniform in ``[lo, 1]``, else
  uniform in ``[max(lo, 1), hi]``). For (0.7, 1.3) that is uniform; for the zoom range
  (0.7, 1.0) it gives ``s = 1`` half of the time, as in the official ``augment_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["OPS", "SVDA", "SVDAParams", "apply_svda"]

#: The six candidate operations, in the order they are applied.
OPS: tuple[str, ...] = ("rotation", "scale", "blur", "brightness", "contrast", "gamma")
_FIELD = {
    "rotation": "rotation_deg",
    "scale": "scale",
    "blur": "blur_sigma",
    "brightness": "brightness",
    "contrast": "contrast",
    "gamma": "gamma",
}
_GAMMA_EPS = 1e-7  # batchgenerators augment_gamma(epsilon=1e-7)
_STD_EPS = 1e-8  # batchgenerators augment_gamma retain_stats


@dataclass(frozen=True)
class SVDAParams:
    """One draw of SVDA.

    Attributes:
        chosen: the ops picked by the without-replacement draw (subset of :data:`OPS`).
        rotation_deg: in-plane rotation angle in degrees about z (see the module docstring);
            +90 equals ``np.rot90(patch, 1, axes=(1, 2))``.
        scale: zoom factor applied to the sampling coordinates (``< 1`` zooms in).
        blur_sigma: isotropic Gaussian sigma in voxels.
        brightness: intensity multiplier.
        contrast: contrast factor about the patch mean.
        gamma: gamma exponent of the min/range-normalised patch.

    A value is None when its op was not chosen or its probability-p draw failed.
    """

    chosen: tuple[str, ...] = ()
    rotation_deg: float | None = None
    scale: float | None = None
    blur_sigma: float | None = None
    brightness: float | None = None
    contrast: float | None = None
    gamma: float | None = None

    def __post_init__(self) -> None:
        unknown = [op for op in self.chosen if op not in OPS]
        if unknown or len(set(self.chosen)) != len(self.chosen):
            raise ValueError(f"chosen must be distinct ops from {OPS}, got {self.chosen}")
        for op, name in _FIELD.items():
            if getattr(self, name) is not None and op not in self.chosen:
                raise ValueError(f"{name} is set but {op!r} is not in chosen={self.chosen}")
        for name in ("scale", "gamma"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.blur_sigma is not None and self.blur_sigma < 0:
            raise ValueError(f"blur_sigma must be >= 0, got {self.blur_sigma}")

    @property
    def applied(self) -> tuple[str, ...]:
        """The ops that will change the patch (chosen and passed their probability draw)."""
        return tuple(op for op in OPS if getattr(self, _FIELD[op]) is not None)


def _range(name: str, value: tuple[float, float], *, positive: bool) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not lo <= hi:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value}")
    if positive and lo <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return lo, hi


def _two_sided(rng: np.random.Generator, lo: float, hi: float) -> float:
    """batchgenerators' factor draw (``augment_contrast``/``augment_gamma``/``augment_scale``)."""
    if rng.random() < 0.5 and lo < 1:
        return float(rng.uniform(lo, 1.0))
    return float(rng.uniform(max(lo, 1.0), hi))


class SVDA:
    """Random SVDA: pick ``n_ops`` of :data:`OPS`, keep each with probability ``p``.

    Args:
        n_ops: how many ops to pick without replacement (official ``sample_num = 3``).
        p: probability that a picked op is applied (official ``p_per_sample = 0.7``).
        rotation_deg: ``r`` for angles in ``[-r, r]`` degrees, or a ``(low, high)`` range.
        scale, blur_sigma, brightness, contrast, gamma: ``(low, high)`` ranges.
        image_order: spline order of the image resampling (3 as official; 1 for speed).
        pad_value: image value outside the patch after rotation/zoom; None: the patch minimum.

    Call ``svda(image, label, rng)`` for sample + apply, or :meth:`sample` then
    :func:`apply_svda` to keep the parameters.
    """

    def __init__(
        self,
        *,
        n_ops: int = 3,
        p: float = 0.7,
        rotation_deg: float | tuple[float, float] = 15.0,
        scale: tuple[float, float] = (0.7, 1.0),
        blur_sigma: tuple[float, float] = (0.7, 1.3),
        brightness: tuple[float, float] = (0.7, 1.3),
        contrast: tuple[float, float] = (0.7, 1.3),
        gamma: tuple[float, float] = (0.7, 1.3),
        image_order: int = 3,
        pad_value: float | None = None,
    ) -> None:
        if not (isinstance(n_ops, int) and 0 <= n_ops <= len(OPS)):
            raise ValueError(f"n_ops must be an int in [0, {len(OPS)}], got {n_ops!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if isinstance(rotation_deg, (int, float)):
            if rotation_deg < 0:
                raise ValueError(f"rotation_deg must be >= 0, got {rotation_deg}")
            rotation_deg = (-float(rotation_deg), float(rotation_deg))
        if image_order not in range(6):
            raise ValueError(f"image_order must be a spline order in 0..5, got {image_order}")
        self.n_ops = n_ops
        self.p = float(p)
        self.rotation_deg = _range("rotation_deg", rotation_deg, positive=False)
        self.scale = _range("scale", scale, positive=True)
        self.blur_sigma = _range("blur_sigma", blur_sigma, positive=True)
        self.brightness = _range("brightness", brightness, positive=True)
        self.contrast = _range("contrast", contrast, positive=True)
        self.gamma = _range("gamma", gamma, positive=True)
        self.image_order = image_order
        self.pad_value = pad_value

    def sample(self, rng: np.random.Generator) -> SVDAParams:
        """Draw the ops and their values; uses only ``rng`` (never the image)."""
        picked = rng.choice(len(OPS), size=self.n_ops, replace=False)
        chosen = tuple(OPS[i] for i in sorted(picked.tolist()))
        values: dict[str, float] = {}
        for op in chosen:  # fixed order, so a seed gives the same draw sequence
            if rng.random() >= self.p:
                continue
            if op == "rotation":
                values["rotation_deg"] = float(rng.uniform(*self.rotation_deg))
            elif op == "scale":
                values["scale"] = _two_sided(rng, *self.scale)
            elif op == "blur":
                values["blur_sigma"] = float(rng.uniform(*self.blur_sigma))
            elif op == "brightness":
                values["brightness"] = float(rng.uniform(*self.brightness))
            elif op == "contrast":
                values["contrast"] = _two_sided(rng, *self.contrast)
            else:
                values["gamma"] = _two_sided(rng, *self.gamma)
        return SVDAParams(chosen=chosen, **values)

    def __call__(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Sample parameters and apply them; see :func:`apply_svda` for shapes."""
        return apply_svda(
            image, label, self.sample(rng), image_order=self.image_order, pad_value=self.pad_value
        )

    def __repr__(self) -> str:
        return (
            f"SVDA(n_ops={self.n_ops}, p={self.p}, rotation_deg={self.rotation_deg}, "
            f"scale={self.scale}, blur_sigma={self.blur_sigma}, brightness={self.brightness}, "
            f"contrast={self.contrast}, gamma={self.gamma}, image_order={self.image_order})"
        )


def _spatial_matrix(params: SVDAParams) -> np.ndarray | None:
    """Output→input matrix on ``(z, y, x)`` offsets from the patch centre, or None if identity.

    Rotation: batchgenerators' ``rotate_coords_3d`` multiplies row coordinates by the rotation
    matrix, i.e. input = Rᵀ·output; in the (y, x) plane
    ``[[cos, sin], [-sin, cos]]``. Zoom: input = s·output (``scale_coords``). An isotropic zoom
    commutes with the rotation, so one matrix serves either official order.
    """
    matrix = np.eye(3)
    if params.rotation_deg is not None:
        a = np.deg2rad(params.rotation_deg)
        matrix[1:, 1:] = [[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]
    if params.scale is not None:
        matrix = matrix * params.scale
    return None if np.allclose(matrix, np.eye(3), rtol=0, atol=1e-12) else matrix


def _contrast(image: np.ndarray, factor: float) -> np.ndarray:
    # batchgenerators augment_contrast, preserve_range=True (ContrastAugmentationTransform default)
    lo, hi = image.min(), image.max()
    mean = image.mean()
    return np.clip((image - mean) * factor + mean, lo, hi)


def _gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    # batchgenerators augment_gamma, per_channel branch, retain_stats=True as the official
    # GammaTransform(..., per_channel=True, retain_stats=True) call in StrongAug.get_StrongAug.
    mean, std = image.mean(), image.std()
    lo = image.min()
    span = float(image.max() - lo) + _GAMMA_EPS
    out = np.power((image - lo) / span, gamma) * span + lo
    out = out - out.mean()
    return out / (out.std() + _STD_EPS) * std + mean


def apply_svda(
    image: np.ndarray,
    label: np.ndarray | None,
    params: SVDAParams,
    *,
    image_order: int = 3,
    pad_value: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply one SVDA draw to a patch.

    Args:
        image: ``(Z, Y, X)`` float image patch (not modified).
        label: ``(Z, Y, X)`` integer label patch, or None (unlabeled data).
        params: from :meth:`SVDA.sample` or built by hand.
        image_order: spline order of the image resampling (label: always 0).
        pad_value: image value outside the patch after rotation/zoom; None: the patch minimum.

    Returns:
        ``(image, label)``: float32 image and label of the label's dtype, same shapes as the
        inputs. Identity parameters return equal arrays.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be (Z, Y, X), got shape {image.shape}")
    if label is not None:
        label = np.asarray(label)
        if label.shape != image.shape:
            raise ValueError(f"label shape {label.shape} differs from image shape {image.shape}")
        if not np.issubdtype(label.dtype, np.integer):
            raise ValueError(f"label must have an integer dtype, got {label.dtype}")
    out = image.astype(np.float32, copy=True)

    matrix = _spatial_matrix(params)
    if matrix is not None:
        centre = (np.asarray(image.shape, dtype=float) - 1.0) / 2.0
        offset = centre - matrix @ centre  # rotate/zoom about the patch centre
        cval = float(out.min()) if pad_value is None else float(pad_value)
        out = ndimage.affine_transform(
            out, matrix, offset=offset, order=image_order, mode="constant", cval=cval
        ).astype(np.float32, copy=False)
        if label is not None:
            label = ndimage.affine_transform(
                label, matrix, offset=offset, order=0, mode="constant", cval=0
            )

    if params.blur_sigma is not None:
        # batchgenerators augment_gaussian_blur: isotropic sigma, scipy default mode "reflect".
        out = ndimage.gaussian_filter(out, params.blur_sigma, order=0)
    if params.brightness is not None:
        out = out * np.float32(params.brightness)
    if params.contrast is not None:
        out = _contrast(out, params.contrast)
    if params.gamma is not None:
        out = _gamma(out, params.gamma)
    return out.astype(np.float32, copy=False), label
