"""Deterministic UIDs for the DICOM objects serving writes.

A result object's UIDs are a function of what it is derived from: the source series, the
model (name and version) and the object's role. Scoring the same series again with the same
model (a retry, a re-sent study) therefore produces the same SeriesInstanceUID and
SOPInstanceUID, and a PACS replaces the object instead of storing a duplicate; another model
version produces new objects beside the old ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset

from medssl.io.dicom_writer import derived_uid as _derived

__all__ = ["derived_uid", "device_uid", "source_series_uid"]


def derived_uid(source_series_uid: str, model_name: str, model_version: int, role: str) -> str:
    """The UID of one result object (or one part of it), e.g. role ``"sr-instance"``.

    Args:
        source_series_uid: SeriesInstanceUID of the scored CT series.
        model_name: the model's name in the repository (``ModelCard.name``).
        model_version: the model version (``ModelCard.version``).
        role: what the UID identifies: ``"sr-series"``, ``"sr-instance"``, ``"seg-series"``,
            ``"seg-instance"``, or a finer role such as ``"finding-1"``.

    Returns:
        ``2.25.`` + a name-based UUID of the four values (the scheme every UID medssl writes
        uses, :func:`medssl.io.dicom_writer.derived_uid`): equal inputs give equal UIDs.

    Raises:
        ValueError: an empty ``source_series_uid``, ``model_name`` or ``role``.
    """
    for name, value in (("source_series_uid", source_series_uid), ("model_name", model_name),
                        ("role", role)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"derived_uid: {name} must be a non-empty string, got {value!r}")
    return _derived("medssl.serving", source_series_uid, model_name, str(int(model_version)), role)


def device_uid(model_name: str, model_version: int) -> str:
    """The Device Observer UID of a model version: the same for every series it scores."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"device_uid: model_name must be a non-empty string, got {model_name!r}")
    return _derived("medssl.serving.device", model_name, str(int(model_version)))


def source_series_uid(source: Sequence[Dataset]) -> str:
    """The one SeriesInstanceUID shared by the datasets of a source series.

    Raises:
        ValueError: ``source`` is empty, or its datasets name no or several series.
    """
    if len(source) == 0:
        raise ValueError("source series is empty: pass the datasets of the scored CT series")
    uids = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in source}
    if len(uids) != 1 or "" in uids:
        raise ValueError(f"source datasets must belong to one series, got SeriesInstanceUIDs "
                         f"{sorted(uids)}")
    return uids.pop()
