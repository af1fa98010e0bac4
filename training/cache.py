"""A disk cache of preprocessed volumes: decode and resample each scan once, then memory-map.

Layout::

    root/<params hash>/params.json        the preprocessing parameters the hash stands for
    root/<params hash>/<key>.npy          float32 (z, y, x) in [-1, 1] (prepare output)
    root/<params hash>/<key>.json         {"shape", "affine" (4x4 index->LPS), "source_spacing",
    ...}
    root/<params hash>/masks/<key>.npy    uint8 (z, y, x) on the same grid (nearest resampling)
    root/<params hash>/masks/<key>.json

The hash covers the target spacing, the intensity window and a format version, so changing
any of them writes a new folder instead of reusing stale arrays.

Writes are atomic (temp file + ``os.replace``, the ``.npy`` before its ``.json``), so two
DataLoader workers racing on one key both succeed: each writes identical content and the last
rename wins. An entry is used only when both files exist and agree (shape, dtype); a
truncated or unreadable entry is rebuilt from the source (a warning is logged) rather than
raising, because the source of truth is the scan, not the cache. Bit flips inside an
otherwise well-formed array are not detected (no checksum: that would read every byte).

This module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl.atomic import atomic_write
from medssl.pipeline.preprocess import Intensity, PercentileIntensity, Preparation, prepare
from medssl.volume import Volume

__all__ = ["CachedVolume", "VolumeCache", "default_cache_dir"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def default_cache_dir() -> Path:
    """``$MEDSSL_CACHE``, else ``~/.cache/medssl``: where ``data.cache_dir: null`` caches."""
    return Path(os.environ.get("MEDSSL_CACHE", Path.home() / ".cache" / "medssl"))


@dataclass
class CachedVolume:
    """A preprocessed volume served from the cache.

    Attributes:
        array: read-only ``np.memmap``, shape ``(Z, Y, X)``; float32 in ``[-1, 1]`` for
            images, uint8 labels for masks.
        affine: 4x4 float64, index ``(z, y, x, 1)`` of the preprocessed grid → LPS mm.
        key: the cache key (e.g. the seriesuid).
        meta: the entry's JSON sidecar (source spacing and shape, parameters).
    """

    array: np.ndarray
    affine: np.ndarray
    key: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_volume(self) -> Volume:
        """A :class:`Volume` over the memmap (no copy); geometry questions go through it."""
        return Volume(self.array, self.affine.copy(), {"cache_key": self.key, **self.meta})

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.to_volume().shape

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size ``(sz, sy, sx)`` in mm of the preprocessed grid."""
        return self.to_volume().spacing

    def world_to_index(self, points_lps: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """LPS points ``(N, 3)`` (x, y, z) in mm → continuous ``(z, y, x)`` indices ``(N, 3)``."""
        return self.to_volume().world_to_index(points_lps)

    def index_to_world(self, index: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """Indices ``(N, 3)`` (z, y, x) → LPS points ``(N, 3)`` in mm."""
        return self.to_volume().index_to_world(index)


class VolumeCache:
    """Preprocessed CT volumes (and masks on their grid) cached as ``.npy`` under ``root``.

    Args:
        root: cache folder (created if missing); may be shared by experiments.
        spacing_mm: target voxel size in mm, one number (isotropic) or ``(z, y, x)``.
        intensity: the normalisation onto ``[-1, 1]`` (an HU window or per-volume percentiles).
    """

    def __init__(
        self,
        root: str | Path,
        spacing_mm: float | Sequence[float],
        intensity: Intensity | PercentileIntensity,
    ) -> None:
        spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise ValueError(f"spacing_mm must be positive (z, y, x) mm, got {spacing_mm!r}")
        if not isinstance(intensity, (Intensity, PercentileIntensity)):
            raise TypeError(
                f"intensity must be a medssl Intensity or PercentileIntensity, got {intensity!r}"
            )
        self.root = Path(root)
        self.spacing_mm = tuple(float(s) for s in spacing)
        self.intensity = intensity
        self.params = {
            "format": CACHE_FORMAT,
            "spacing_mm": list(self.spacing_mm),
            "intensity": intensity.to_json(),
        }
        blob = json.dumps(self.params, sort_keys=True).encode()
        self.hash = hashlib.sha256(blob).hexdigest()[:12]
        self.dir = self.root / self.hash
        (self.dir / "masks").mkdir(parents=True, exist_ok=True)
        params_file = self.dir / "params.json"
        if not params_file.exists():
            text = json.dumps(self.params, indent=2)
            atomic_write(params_file, lambda fh: fh.write(text), "w")

    # -- paths ------------------------------------------------------------------------------
    def _paths(self, key: str, mask: bool) -> tuple[Path, Path]:
        if not isinstance(key, str) or not _KEY.match(key) or key in (".", ".."):
            raise ValueError(
                f"cache key {key!r} must be a file name of letters, digits, '.', '_', '-' "
                "(e.g. a seriesuid)"
            )
        folder = self.dir / "masks" if mask else self.dir
        return folder / f"{key}.npy", folder / f"{key}.json"

    def path(self, key: str) -> Path:
        """The ``.npy`` file of image ``key`` (whether or not it exists yet)."""
        return self._paths(key, mask=False)[0]

    def mask_path(self, key: str) -> Path:
        """The ``.npy`` file of mask ``key`` (whether or not it exists yet)."""
        return self._paths(key, mask=True)[0]

    # -- entries ----------------------------------------------------------------------------
    def _open(self, key: str, mask: bool) -> CachedVolume | None:
        npy, sidecar = self._paths(key, mask)
        if not (npy.is_file() and sidecar.is_file()):
            return None
        dtype = np.uint8 if mask else np.float32
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            array = np.load(npy, mmap_mode="r", allow_pickle=False)
            affine = np.asarray(meta["affine"], dtype=np.float64)
            if list(array.shape) != list(meta["shape"]) or array.dtype != dtype:
                raise ValueError(
                    f"array {array.shape} {array.dtype} does not match sidecar "
                    f"{meta['shape']} {np.dtype(dtype)}"
                )
            if affine.shape != (4, 4):
                raise ValueError(f"affine has shape {affine.shape}, expected (4, 4)")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("cache entry %s is unreadable (%s); rebuilding it", npy, exc)
            return None
        return CachedVolume(array, affine, key, meta)

    def _write(self, key: str, mask: bool, vol: Volume, source: Volume) -> CachedVolume:
        npy, sidecar = self._paths(key, mask)
        meta = {
            "key": key,
            "kind": "mask" if mask else "image",
            "shape": list(vol.shape),
            "dtype": str(vol.array.dtype),
            "affine": vol.affine.tolist(),
            "source_spacing": source.spacing.tolist(),
            "source_shape": list(source.shape),
            "params": self.params,
        }
        array = np.ascontiguousarray(vol.array)
        atomic_write(npy, lambda fh: np.save(fh, array, allow_pickle=False))
        text = json.dumps(meta, indent=1)
        atomic_write(sidecar, lambda fh: fh.write(text), "w")
        cached = self._open(key, mask)
        if cached is None:  # pragma: no cover - only if the disk lost what we just wrote
            raise OSError(f"cache entry {npy} cannot be read back after writing it")
        return cached

    def get(self, key: str, load: Callable[[], Volume]) -> CachedVolume:
        """The preprocessed volume for ``key``, computing and storing it on a miss.

        Args:
            key: a file-name-safe id, e.g. the seriesuid.
            load: called only on a miss; returns the HU :class:`Volume` (any spacing).

        Returns:
            A :class:`CachedVolume` whose array is a read-only memmap, float32 ``(Z, Y, X)``
            in ``[-1, 1]``, equal to ``prepare(load(), Preparation(spacing_mm, intensity))``.
        """
        cached = self._open(key, mask=False)
        if cached is not None:
            return cached
        source = load()
        if not isinstance(source, Volume):
            raise TypeError(f"load() for cache key {key!r} must return a Volume, got {source!r}")
        vol = prepare(source, Preparation(self.spacing_mm, self.intensity))
        return self._write(key, False, vol, source)

    def get_mask(self, key: str, load: Callable[[], Volume]) -> CachedVolume:
        """The label mask for ``key`` on the preprocessed grid, uint8, computing it on a miss.

        Args:
            key: the same key as the image.
            load: called only on a miss; returns an integer-valued :class:`Volume` (labels
                0..255) on the scan's source grid, e.g. a LUNA16 ``seg-lungs`` mask.

        Returns:
            A :class:`CachedVolume` with a uint8 memmap, resampled with nearest neighbour
            exactly as :func:`~medssl.pipeline.prepare` resamples the image.

        Raises:
            ValueError: labels are not integers in 0..255, or the image of ``key`` is
                cached on a different grid (the mask does not belong to that scan).
        """
        cached = self._open(key, mask=True)
        if cached is not None:
            return cached
        source = load()
        if not isinstance(source, Volume):
            raise TypeError(f"load() for mask key {key!r} must return a Volume, got {source!r}")
        labels = np.asarray(source.array)
        if labels.size and (
            labels.min() < 0 or labels.max() > 255 or not np.array_equal(labels, np.round(labels))
        ):
            raise ValueError(
                f"mask {key!r} must hold integer labels in 0..255, got values in "
                f"[{labels.min()}, {labels.max()}]"
            )
        source = source.with_array(labels.astype(np.uint8))
        target = np.asarray(self.spacing_mm)
        same = np.allclose(source.spacing, target, atol=1e-3)  # as prepare decides
        vol = source if same else source.resample(target, "nearest")
        image = self._open(key, mask=False)
        if image is not None and (
            image.shape != vol.shape or not np.allclose(image.affine, vol.affine, atol=1e-4)
        ):
            raise ValueError(
                f"mask {key!r} resamples to shape {vol.shape} but the cached image is "
                f"{image.shape} (or their affines differ): the mask is not on the scan's grid"
            )
        return self._write(key, True, vol, source)
