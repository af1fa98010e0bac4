"""Typed errors raised by medssl.

Every error a user can cause (a bad file, a bad series, a bad argument) is a
:class:`MedsslError`. The command line prints its message on stderr and exits
non-zero, without a traceback. Errors about one input name that input in
``path`` and say what was wrong in ``problem``, so a batch job can log them as
a row instead of stopping.
"""

from __future__ import annotations

import traceback
from pathlib import Path

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CorruptFileError",
    "DatasetLayoutError",
    "DuplicateSliceError",
    "EvaluationInputError",
    "ExportError",
    "GantryTiltError",
    "ImplausibleGeometryError",
    "LocalizerError",
    "MedsslError",
    "MissingSliceError",
    "ModelCardError",
    "ModelRepositoryError",
    "MultipleSeriesError",
    "NonUniformSpacingError",
    "NotAnImageError",
    "ParityError",
    "RunnerError",
    "SeriesGeometryError",
    "UnsupportedFormatError",
    "VolumeReadError",
    "describe_error",
]


class MedsslError(Exception):
    """Base class of every error medssl raises on purpose."""


class _PathProblem(MedsslError):
    """An error about one file or folder, shown as ``path: problem``.

    Args:
        path: the file or directory at fault.
        problem: what was wrong, in words a user can act on.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class VolumeReadError(_PathProblem):
    """A file or series could not be read as a CT volume (``path``, ``problem``)."""


class UnsupportedFormatError(VolumeReadError):
    """The path is not in a format medssl reads (DICOM, NIfTI, MetaImage)."""


class CorruptFileError(VolumeReadError):
    """The file is truncated or not parseable."""


class NotAnImageError(VolumeReadError):
    """The DICOM object is valid but holds no CT image (an SR, a SEG, ...)."""


class SeriesGeometryError(VolumeReadError):
    """The slices of a series do not form one regular 3D grid."""


class MissingSliceError(SeriesGeometryError):
    """A gap in slice positions shows that one or more slices are missing."""


class DuplicateSliceError(SeriesGeometryError):
    """Two or more slices share one position along the slice normal."""


class NonUniformSpacingError(SeriesGeometryError):
    """Slice spacing varies more than the tolerance, without a clean gap."""


class GantryTiltError(SeriesGeometryError):
    """The slice stack is sheared: positions do not move along the slice normal."""


class ImplausibleGeometryError(SeriesGeometryError):
    """A series' spacing, extent or voxel count is beyond the plausible limits of CT
    (:class:`medssl.io.limits.GeometryLimits`); refused before its pixels are allocated.

    Attributes:
        quantity: what was out of range (``"PixelSpacing (row)"``, ``"extent along z"``, ...).
        value: its value, with the unit.
        limit: the allowed range.
    """

    def __init__(self, path: str | Path, quantity: str, value: str, limit: str) -> None:
        self.quantity, self.value, self.limit = quantity, value, limit
        super().__init__(
            path,
            f"implausible geometry: {quantity} is {value}, the limit is {limit} "
            "(medssl.io.limits.GeometryLimits)",
        )


class LocalizerError(VolumeReadError):
    """The series is a localizer (scout / topogram), not a volume."""


class MultipleSeriesError(VolumeReadError):
    """A directory holds more than one series and none was chosen.

    Attributes:
        series_uids: the SeriesInstanceUIDs found, for the user to pick one.
    """

    def __init__(self, path: str | Path, series_uids: list[str]) -> None:
        self.series_uids = list(series_uids)
        listed = ", ".join(self.series_uids)
        super().__init__(
            path,
            f"holds {len(self.series_uids)} series ({listed}); pass series_uid= "
            "(or --series-uid) to choose one",
        )


class DatasetLayoutError(MedsslError):
    """A dataset folder does not follow the layout it claims (LUNA16, Decathlon)."""


class ConfigError(MedsslError):
    """An experiment configuration (YAML file or override) is invalid.

    Args:
        message: what was wrong and what to do; names the key and the bad value.
        key: the dotted key at fault (``"focalmix.sharpen_t"``), ``""`` for the whole file.
    """

    def __init__(self, message: str, *, key: str = "") -> None:
        self.key = key
        super().__init__(message)


class CheckpointError(_PathProblem):
    """A checkpoint file is missing, truncated or not a medssl checkpoint (``path``,
    ``problem``)."""


class EvaluationInputError(MedsslError):
    """Input to an evaluation (annotations, seriesuids, predictions) is missing or malformed.

    Args:
        path: the file at fault, or None when the input came from memory.
        problem: what was wrong, in words a user can act on.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")


class ModelCardError(_PathProblem):
    """A model card (``medssl.json``) is missing, unreadable or invalid."""


class ModelRepositoryError(_PathProblem):
    """A Triton model repository, model folder or ``config.pbtxt`` is missing or invalid."""


class ExportError(MedsslError):
    """A checkpoint cannot be exported (unknown model type, no TensorRT/GPU, bad options)."""


class ParityError(ExportError):
    """The exported graph disagrees with the PyTorch model beyond the tolerance.

    Attributes:
        report: the measured errors (:class:`medssl.export.parity.ParityReport`).
    """

    def __init__(self, message: str, report: object) -> None:
        self.report = report
        super().__init__(message)


class RunnerError(MedsslError):
    """A model runner cannot run: the server is unreachable or not ready, the model's
    metadata disagrees with its card, or an inference call failed after its retries."""


def describe_error(exc: BaseException) -> str:
    """``exc`` as text that quotes no input value, for logs, job stores and result tables.

    medssl's own errors (:class:`MedsslError`) say what was wrong in words that name paths,
    UIDs and limits, never a header's value: ``"Type: message"``. Any other exception's
    message may quote the bytes or values it failed on (pydicom, highdicom and numpy quote
    them, a damaged header may put the patient's name there): ``"Type at file.py:line"``,
    where it was raised, its message withheld.
    """
    name = type(exc).__name__
    if isinstance(exc, MedsslError):
        message = str(exc)
        return f"{name}: {message}" if message else name
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    if not frames:
        return name
    return f"{name} at {Path(frames[-1].filename).name}:{frames[-1].lineno}"
