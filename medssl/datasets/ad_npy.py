"""A&D's preprocessed layout (xmed-lab/GenericSSL): one ``.npy`` per image and label, text splits.

Layout (``LA_data/``, ``Synapse_data/``, ``MMWHS_data/``, ``MNMS_data/`` in that repository)::

    npy/<id>_image.npy           image array (float32)
    npy/<id>_label.npy           label array (integers; float32 holding whole numbers for Synapse)
    split_txts/<split>.txt       one id a line: train, eval, test, labeled_0.2, unlabeled_0.2, ...

The axis order of the stored arrays depends on the task's preprocessing script
(``code/data/preprocess_*.py``), so it is an argument, ``axis_order``:

* ``"zyx"``: Synapse, MMWHS and M&Ms read NIfTI with SimpleITK's ``GetArrayFromImage``,
  which gives ``(z, y, x)``; Synapse is then resized to a fixed shape (80, 160, 160).
* ``"xyz"``: LA copies UA-MT's ``mri_norm2.h5`` arrays, stored ``(x, y, z)``
  (see :mod:`medssl.datasets.la_h5`).

:class:`ADNumpy` always returns ``(z, y, x)`` arrays. The layout stores no geometry
(Synapse's resizing even discards the original voxel size), so the voxel size is the
``spacing`` argument. Its default, 1 mm, makes mm-based metrics equal voxel-based
ones, which is what A&D's ``code/evaluate.py`` reports (medpy without ``voxelspacing``).
The affine is nominal: origin 0, axial directions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from medssl.errors import DatasetLayoutError
from medssl.volume import Volume, affine_from_geometry

__all__ = ["ADNumpy", "AxisOrder", "write_ad_npy"]

AxisOrder = Literal["zyx", "xyz"]
_TO_ZYX = {"zyx": (0, 1, 2), "xyz": (2, 1, 0)}  # transposes between stored and (z, y, x)


class ADNumpy:
    """Read an A&D preprocessed ``npy/`` + ``split_txts/`` folder.

    Args:
        root: the folder holding ``npy/`` and ``split_txts/`` (A&D's ``config.save_dir``).
        spacing: voxel size ``(sz, sy, sx)`` in mm of the returned ``(z, y, x)`` arrays.
        axis_order: the order of the stored arrays, ``"zyx"`` (Synapse, MMWHS, M&Ms)
            or ``"xyz"`` (LA).

    Raises:
        DatasetLayoutError: ``npy/`` or ``split_txts/`` is missing.
        ValueError: ``spacing`` is not three positive numbers or ``axis_order`` is unknown.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        axis_order: AxisOrder = "zyx",
    ) -> None:
        if axis_order not in _TO_ZYX:
            raise ValueError(f"axis_order must be 'zyx' or 'xyz', got {axis_order!r}")
        self.root = Path(root)
        self.axis_order = axis_order
        self.affine = affine_from_geometry((0.0, 0.0, 0.0), spacing)
        for folder in ("npy", "split_txts"):
            if not (self.root / folder).is_dir():
                raise DatasetLayoutError(
                    f"{self.root / folder}: missing; expected A&D's preprocessed layout "
                    "(npy/<id>_image.npy, npy/<id>_label.npy, split_txts/<split>.txt) as "
                    "written by GenericSSL's code/data/preprocess_*.py"
                )

    def splits(self) -> list[str]:
        """The split names, from ``split_txts/<split>.txt``, sorted."""
        return sorted(path.stem for path in (self.root / "split_txts").glob("*.txt"))

    def ids(self, split: str) -> list[str]:
        """The ids listed in ``split_txts/<split>.txt``, sorted as A&D's ``read_list`` sorts them.

        Raises:
            DatasetLayoutError: no such split (the message lists the ones there are).
        """
        path = self.root / "split_txts" / f"{split}.txt"
        if not path.is_file():
            raise DatasetLayoutError(
                f"{path}: no split {split!r}; splits in {path.parent}: "
                f"{', '.join(self.splits()) or 'none'}"
            )
        return sorted(line.strip() for line in path.read_text().splitlines() if line.strip())

    def image(self, data_id: str) -> Volume:
        """The image of ``data_id`` as stored (float32 in A&D), shape ``(Z, Y, X)``."""
        return self._read(data_id, "image")

    def label(self, data_id: str) -> Volume:
        """The label map of ``data_id``, shape ``(Z, Y, X)``.

        Integer labels keep their dtype; float labels (Synapse) become int16.

        Raises:
            DatasetLayoutError: the stored labels are not whole numbers within int16.
        """
        volume = self._read(data_id, "label")
        stored = volume.array
        if np.issubdtype(stored.dtype, np.integer):
            return volume
        info = np.iinfo(np.int16)
        whole = np.all(np.isfinite(stored)) and not np.any(stored % 1)
        if not whole or (stored.size and (stored.min() < info.min or stored.max() > info.max)):
            raise DatasetLayoutError(
                f"{volume.meta['source']}: {stored.dtype} labels are not whole numbers "
                "within int16; is this an image saved under a label name?"
            )
        return volume.with_array(stored.astype(np.int16))

    def _read(self, data_id: str, kind: str) -> Volume:
        path = self.root / "npy" / f"{data_id}_{kind}.npy"
        if not path.is_file():
            raise DatasetLayoutError(
                f"{path}: missing; every id in split_txts/ needs npy/<id>_image.npy and "
                "npy/<id>_label.npy"
            )
        try:
            stored = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DatasetLayoutError(f"{path}: not a readable .npy array ({exc})") from None
        if stored.ndim != 3:
            raise DatasetLayoutError(f"{path}: shape {stored.shape}, expected a 3D array")
        array = np.ascontiguousarray(stored.transpose(_TO_ZYX[self.axis_order]))
        meta = {"source": str(path), "format": "ad_npy", "id": data_id}
        return Volume(array, self.affine.copy(), meta)


def write_ad_npy(
    root: str | Path,
    cases: Mapping[str, tuple[np.ndarray, np.ndarray]],
    splits: Mapping[str, Sequence[str]],
    *,
    axis_order: AxisOrder = "zyx",
) -> None:
    """Write cases in A&D's layout: ``npy/<id>_image.npy``, ``npy/<id>_label.npy``,
    ``split_txts/<split>.txt``. Made for test fixtures.

    Args:
        root: the folder to write into (created if missing).
        cases: ``{id: (image, label)}``, both ``(Z, Y, X)`` of one shape; the image is
            stored as float32, the label in its own dtype, both in ``axis_order``.
        splits: ``{split name: ids}``, each id one of ``cases``; written in the given order.
        axis_order: the stored order, ``"zyx"`` or ``"xyz"``.

    Raises:
        ValueError: unknown ``axis_order``, a split lists an id not in ``cases``, or an
            image and its label differ in shape or are not 3D.
    """
    if axis_order not in _TO_ZYX:
        raise ValueError(f"axis_order must be 'zyx' or 'xyz', got {axis_order!r}")
    for name, ids in splits.items():
        unknown = sorted(set(ids) - set(cases))
        if unknown:
            raise ValueError(f"split {name!r} lists ids {unknown} that are not in cases")
    root = Path(root)
    (root / "npy").mkdir(parents=True, exist_ok=True)
    (root / "split_txts").mkdir(parents=True, exist_ok=True)
    order = _TO_ZYX[axis_order]  # both transposes are their own inverse
    for data_id, (image, label) in cases.items():
        if image.ndim != 3 or image.shape != label.shape:
            raise ValueError(
                f"id {data_id!r}: image {image.shape} and label {label.shape} must be one 3D shape"
            )
        np.save(root / "npy" / f"{data_id}_image.npy", image.astype(np.float32).transpose(order))
        np.save(root / "npy" / f"{data_id}_label.npy", label.transpose(order))
    for name, ids in splits.items():
        (root / "split_txts" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
