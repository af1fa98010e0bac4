"""The Left Atrium (LA, 2018 Atrial Segmentation Challenge) set as UA-MT and SSL4MIS ship it.

Layout (UA-MT ``data/``, SSL4MIS ``data/LA``, A&D ``Datasets/LASeg``)::

    train.list                       80 case folder names, one a line
    test.list                        20 case folder names
    2018LA_Seg_Training Set/         <- ``root``
        <case>/mri_norm2.h5          h5 datasets ``image`` (float32) and ``label`` (uint8)

UA-MT's ``la_heart_processing.py`` builds each ``mri_norm2.h5`` from the challenge's
``lgemri.nrrd`` / ``laendo.nrrd`` read with pynrrd, so the arrays are stored in
``(x, y, z)`` order; the image is z-scored MRI (not HU), cropped around the atrium
in x and y; the label is 1 inside the atrium, 0 elsewhere. The loaders
(``dataloaders/la_heart.py``) read ``h5f['image'][:]`` as is.

:class:`LAHeart` returns ``(z, y, x)`` arrays (transposed from the stored order). The
h5 files carry no geometry: the volumes get the challenge's isotropic 0.625 mm voxel
(:data:`LA_SPACING_MM`) and a nominal affine (origin 0, axial directions), good for
mm-based metrics but not for placing the volume in a patient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from medssl.errors import DatasetLayoutError
from medssl.volume import Volume, affine_from_geometry

__all__ = ["LA_SPACING_MM", "LAHeart", "write_la_h5"]

LA_SPACING_MM = 0.625
"""Voxel size of the LA challenge MRI, isotropic, in mm."""

H5_NAME = "mri_norm2.h5"
LIST_NAMES = ("train.list", "test.list")


class LAHeart:
    """Read the UA-MT Left Atrium h5 set.

    Args:
        root: the folder holding ``<case>/mri_norm2.h5`` (UA-MT's
            ``2018LA_Seg_Training Set``).
        list_dir: the folder holding ``train.list`` and ``test.list``. Default: ``root``
            if both lists are there, else ``root``'s parent (where UA-MT and A&D keep them).

    Attributes:
        train_cases: case names of the standard training split (80), in file order.
        test_cases: case names of the standard test split (20), in file order.

    Raises:
        DatasetLayoutError: ``root`` is not a folder, the lists are missing, or a case
            is listed in both.
    """

    def __init__(self, root: str | Path, list_dir: str | Path | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetLayoutError(
                f"{self.root}: not a folder; pass the folder holding <case>/{H5_NAME} "
                "(UA-MT's '2018LA_Seg_Training Set')"
            )
        self.list_dir = _find_list_dir(self.root, None if list_dir is None else Path(list_dir))
        self.train_cases = _read_case_list(self.list_dir / "train.list")
        self.test_cases = _read_case_list(self.list_dir / "test.list")
        both = sorted(set(self.train_cases) & set(self.test_cases))
        if both:
            raise DatasetLayoutError(
                f"{self.list_dir}: train.list and test.list share {len(both)} case(s) "
                f"({', '.join(both[:3])}); a case belongs to one split"
            )

    def path(self, case: str) -> Path:
        """The case's ``<root>/<case>/mri_norm2.h5``."""
        return self.root / case / H5_NAME

    def image(self, case: str) -> Volume:
        """The case's z-scored MRI, float32, shape ``(Z, Y, X)``, 0.625 mm voxels."""
        return self._read(case, "image")

    def label(self, case: str) -> Volume:
        """The case's atrium mask (1 = atrium), uint8, shape ``(Z, Y, X)``, 0.625 mm voxels."""
        return self._read(case, "label")

    def _read(self, case: str, key: str) -> Volume:
        path = self.path(case)
        if not path.is_file():
            raise DatasetLayoutError(
                f"{path}: missing; expected <root>/<case>/{H5_NAME} for case {case!r}"
            )
        try:
            with h5py.File(path, "r") as h5:
                if key not in h5:
                    raise DatasetLayoutError(
                        f"{path}: has no '{key}' dataset (found {sorted(h5.keys())}); "
                        "expected 'image' and 'label' as UA-MT writes them"
                    )
                stored = h5[key][()]
        except OSError as exc:
            raise DatasetLayoutError(f"{path}: not a readable HDF5 file ({exc})") from None
        if stored.ndim != 3:
            raise DatasetLayoutError(f"{path}: '{key}' has shape {stored.shape}, expected 3D")
        array = np.ascontiguousarray(stored.transpose(2, 1, 0))
        affine = affine_from_geometry((0.0, 0.0, 0.0), (LA_SPACING_MM,) * 3)
        return Volume(array, affine, {"source": str(path), "format": "la_h5", "case": case})


def write_la_h5(
    root: str | Path,
    cases: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    test: Sequence[str] = (),
) -> None:
    """Write cases in UA-MT's layout: ``<root>/<case>/mri_norm2.h5``, ``train.list``, ``test.list``.

    Made for test fixtures: the lists go into ``root`` itself.

    Args:
        root: the folder to write into (created if missing).
        cases: ``{case: (image, label)}``, both arrays ``(Z, Y, X)`` of one shape; stored
            transposed to ``(x, y, z)``, the image as float32 and the label as uint8.
        test: the cases listed in ``test.list``; the others go to ``train.list`` in
            ``cases`` order.

    Raises:
        ValueError: a test case is not in ``cases``, an image and its label differ
            in shape or are not 3D, or a label value does not fit uint8.
    """
    unknown = sorted(set(test) - set(cases))
    if unknown:
        raise ValueError(f"test cases {unknown} are not in cases {sorted(cases)}")
    root = Path(root)
    for case, (image, label) in cases.items():
        if image.ndim != 3 or image.shape != label.shape:
            raise ValueError(
                f"case {case!r}: image {image.shape} and label {label.shape} must be one 3D shape"
            )
        if label.size and (label.min() < 0 or label.max() > 255 or np.any(label % 1)):
            raise ValueError(f"case {case!r}: label values must be whole numbers in [0, 255]")
        folder = root / case
        folder.mkdir(parents=True, exist_ok=True)
        with h5py.File(folder / H5_NAME, "w") as h5:
            h5.create_dataset("image", data=image.astype(np.float32).transpose(2, 1, 0))
            h5.create_dataset("label", data=label.astype(np.uint8).transpose(2, 1, 0))
    test_set = set(test)
    train = [case for case in cases if case not in test_set]
    (root / "train.list").write_text("".join(f"{case}\n" for case in train))
    (root / "test.list").write_text("".join(f"{case}\n" for case in test))


def _find_list_dir(root: Path, list_dir: Path | None) -> Path:
    candidates = [list_dir] if list_dir is not None else [root, root.parent]
    for folder in candidates:
        if all((folder / name).is_file() for name in LIST_NAMES):
            return folder
    searched = " or ".join(str(folder) for folder in candidates)
    raise DatasetLayoutError(
        f"{root}: train.list and test.list not found in {searched}; put UA-MT's lists "
        "(80 train / 20 test case folder names) there, or pass list_dir="
    )


def _read_case_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
