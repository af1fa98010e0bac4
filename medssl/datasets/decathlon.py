"""The Medical Segmentation Decathlon / nnU-Net raw layout.

``dataset.json`` + ``imagesTr/``, ``labelsTr/``, ``imagesTs/`` (and, where the
ground truth of test cases is known, ``labelsTs/``). Both dialects are read:

* MSD v1: ``"training": [{"image": "./imagesTr/x.nii.gz", "label": ...}]``,
  ``"test": ["./imagesTs/y.nii.gz"]``, ``"labels": {"0": "background", ...}``;
* nnU-Net v2: ``"labels": {"background": 0, ...}``, ``"file_ending"``, and images
  named ``<case>_0000<ending>`` (one channel per suffix).

medssl writes MSD v1 with single-channel images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from medssl.errors import DatasetLayoutError
from medssl.io.common import hu_int16
from medssl.io.nifti import read_nifti, write_nifti
from medssl.volume import Volume

__all__ = ["Decathlon", "DecathlonCase", "DecathlonWriter"]


@dataclass(frozen=True)
class DecathlonCase:
    """One case: its id, image path and label path (None for unlabelled test images)."""

    case_id: str
    image: Path
    label: Path | None


class Decathlon:
    """Read a Decathlon / nnU-Net raw dataset folder.

    Raises:
        DatasetLayoutError: ``dataset.json`` missing or malformed, or a listed file absent.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / "dataset.json"
        if not path.is_file():
            raise DatasetLayoutError(
                f"{self.root}: dataset.json is missing; expected the Decathlon layout "
                "(dataset.json, imagesTr/, labelsTr/, imagesTs/)"
            )
        try:
            self.spec = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetLayoutError(f"{path}: not valid JSON ({exc})") from None
        self.labels = _parse_labels(self.spec.get("labels"), path)
        self.training = self._training_cases()
        self.test = self._test_cases()

    @property
    def modality(self) -> str:
        """The first channel's modality (``"CT"``, ``"MR"``, ...)."""
        channels = self.spec.get("modality") or self.spec.get("channel_names") or {"0": ""}
        return str(channels.get("0", ""))

    def image(self, case: DecathlonCase) -> Volume:
        """The case's image, float32."""
        return read_nifti(case.image)

    def label(self, case: DecathlonCase) -> Volume:
        """The case's label map (integer dtype)."""
        if case.label is None:
            raise DatasetLayoutError(f"{case.case_id} has no label")
        return read_nifti(case.label, label=True)

    def _training_cases(self) -> list[DecathlonCase]:
        if "training" in self.spec:
            return [
                DecathlonCase(
                    _case_id(item["image"]), self._file(item["image"]), self._file(item["label"])
                )
                for item in self.spec["training"]
            ]
        ending = self.spec.get("file_ending", ".nii.gz")
        cases = []
        for image in sorted((self.root / "imagesTr").glob(f"*_0000{ending}")):
            case_id = image.name[: -len(f"_0000{ending}")]
            cases.append(DecathlonCase(case_id, image, self._file(f"labelsTr/{case_id}{ending}")))
        return cases

    def _test_cases(self) -> list[DecathlonCase]:
        items = self.spec.get("test")
        if items is None:
            ending = self.spec.get("file_ending", ".nii.gz")
            items = [
                str(p.relative_to(self.root))
                for p in sorted((self.root / "imagesTs").glob(f"*{ending}"))
            ]
        cases = []
        for item in items:
            image = self._file(item)
            label = self.root / "labelsTs" / image.name
            cases.append(DecathlonCase(_case_id(item), image, label if label.is_file() else None))
        return cases

    def _file(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_file():
            raise DatasetLayoutError(f"{self.root}/dataset.json lists {relative}, which is missing")
        return path


class DecathlonWriter:
    """Write cases in MSD v1 layout; ``dataset.json`` is written by :meth:`close`.

    CT images are stored as int16 HU; other modalities as float32; labels keep their dtype.
    """

    def __init__(
        self,
        root: str | Path,
        name: str,
        labels: Mapping[int, str],
        modality: str = "CT",
        description: str = "",
    ) -> None:
        self.root = Path(root)
        self.name, self.labels, self.modality, self.description = (
            name,
            labels,
            modality,
            description,
        )
        self._training: list[dict[str, str]] = []
        self._test: list[str] = []

    def add_training(self, case_id: str, image: Volume, label: Volume) -> None:
        """Write ``imagesTr/<id>.nii.gz`` and ``labelsTr/<id>.nii.gz``."""
        write_nifti(self._stored(image), self.root / "imagesTr" / f"{case_id}.nii.gz")
        write_nifti(label, self.root / "labelsTr" / f"{case_id}.nii.gz")
        self._training.append(
            {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}
        )

    def add_test(self, case_id: str, image: Volume, label: Volume | None = None) -> None:
        """Write ``imagesTs/<id>.nii.gz`` (and ``labelsTs/`` when the truth is known)."""
        write_nifti(self._stored(image), self.root / "imagesTs" / f"{case_id}.nii.gz")
        if label is not None:
            write_nifti(label, self.root / "labelsTs" / f"{case_id}.nii.gz")
        self._test.append(f"./imagesTs/{case_id}.nii.gz")

    def _stored(self, image: Volume) -> Volume:
        """CT images are stored as int16 HU, as the Decathlon's CT tasks are; others as float32."""
        return image.with_array(hu_int16(image.array)) if self.modality == "CT" else image

    def close(self) -> Path:
        """Write ``dataset.json``."""
        spec = {
            "name": self.name,
            "description": self.description,
            "tensorImageSize": "3D",
            "modality": {"0": self.modality},
            "labels": {"0": "background", **{str(k): v for k, v in sorted(self.labels.items())}},
            "numTraining": len(self._training),
            "numTest": len(self._test),
            "training": self._training,
            "test": self._test,
        }
        path = self.root / "dataset.json"
        self.root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(spec, indent=2) + "\n")
        return path


def _case_id(relative: str) -> str:
    name = Path(relative).name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _parse_labels(labels: object, path: Path) -> dict[int, str]:
    """Label value -> name, from either dialect; background excluded."""
    if not isinstance(labels, dict) or not labels:
        raise DatasetLayoutError(f"{path}: 'labels' must be a non-empty mapping")
    parsed: dict[int, str] = {}
    for key, value in labels.items():
        if str(key).lstrip("-").isdigit():
            parsed[int(key)] = str(value)  # MSD v1: {"1": "liver"}
        elif isinstance(value, int):
            parsed[value] = str(key)  # nnU-Net v2: {"liver": 1}
        else:
            raise DatasetLayoutError(f"{path}: cannot read label entry {key!r}: {value!r}")
    parsed.pop(0, None)
    return parsed
