"""Deterministic UIDs for the DICOM objects serving and scoring write.

A result object's UIDs are a function of what it is derived from *and of what it contains*:
the source series, the model (name and version), the object's role, and a content key, a
digest of everything else that shapes the object (the reported findings, the threshold and
options that chose them, the source instances recorded as evidence, a referenced SEG, the
SEG type and its masks). So:

* the same inputs with the same settings give the same SeriesInstanceUID and
  SOPInstanceUID: a retry (or a re-sent study) makes a PACS replace the object instead of
  storing a duplicate;
* any change of content gives new UIDs: a report at another threshold, with or without its
  companion SEG, with a finding moved or re-scored, from another model version, or covering
  more source instances (late arrivals) is a new object beside the old one, never one that a
  PACS silently drops or overwrites because it reuses an earlier object's UID.

Floats enter a content key rounded (:data:`MM_DECIMALS` for mm, :data:`PROBABILITY_DECIMALS`
for probabilities): two objects whose values agree to that precision are the same content.
The precision is far below what the objects display (SR measurements, sphere masks on a
voxel grid), and it absorbs last-bit float noise between runs, so a retry on another runner
stays idempotent.

The keys are built by :func:`content_key` from JSON-able parts (:func:`detections_key`,
:func:`instances_key`, :func:`card_key`, :func:`array_key`); the writers
(:mod:`medssl.dicom.sr`, :mod:`medssl.dicom.seg`) assemble them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from medssl.finding import Finding
from medssl.io.dicom_writer import derived_uid as _derived
from medssl.models.card import Label, ModelCard

__all__ = [
    "MM_DECIMALS",
    "PROBABILITY_DECIMALS",
    "array_key",
    "card_key",
    "content_key",
    "derived_uid",
    "detection_key",
    "detections_key",
    "device_uid",
    "frame_of_reference_uid",
    "instances_key",
    "jsonable",
    "label_key",
    "report_key",
    "source_series_uid",
]

#: Decimals of mm values (centres, diameters) in a content key: 0.001 mm.
MM_DECIMALS = 3
#: Decimals of probabilities in a content key: 1e-6.
PROBABILITY_DECIMALS = 6


def derived_uid(
    source_series_uid: str, model_name: str, model_version: int, role: str, *, content: str
) -> str:
    """The UID of one result object (or one part of it), e.g. role ``"sr-instance"``.

    Args:
        source_series_uid: SeriesInstanceUID of the scored CT series.
        model_name: the model's name in the repository (``ModelCard.name``).
        model_version: the model version (``ModelCard.version``).
        role: what the UID identifies: ``"sr-series"``, ``"sr-instance"``, ``"seg-series"``,
            ``"seg-instance"``, or a finer role such as ``"finding"``.
        content: the content key of what the UID identifies (:func:`content_key`, or
            :func:`report_key` for an SR); ``""`` only for something fully identified by
            the other four values.

    Returns:
        ``2.25.`` + a name-based UUID of the five values (the scheme every UID medssl writes
        uses, :func:`medssl.io.dicom_writer.derived_uid`): equal inputs give equal UIDs.

    Raises:
        ValueError: an empty ``source_series_uid``, ``model_name`` or ``role``, or a
            ``content`` that is not a string.
    """
    for name, value in (
        ("source_series_uid", source_series_uid),
        ("model_name", model_name),
        ("role", role),
    ):
        if not isinstance(value, str) or not value:
            raise ValueError(f"derived_uid: {name} must be a non-empty string, got {value!r}")
    if not isinstance(content, str):
        raise ValueError(
            f"derived_uid: content must be a string (a content key), got {type(content).__name__}"
        )
    return _derived(
        "medssl.serving", source_series_uid, model_name, str(int(model_version)), role, content
    )


def content_key(**parts: Any) -> str:
    """A digest of an object's content: SHA-256 (hex) of the parts as canonical JSON.

    Args:
        parts: JSON-able values (numbers, strings, None, lists, dicts with string keys);
            floats must already be rounded (the helpers here round). Key order does not
            matter; list order does.

    Raises:
        TypeError: a part that JSON cannot encode (named by ``json``).
    """
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def detection_key(detection: Finding) -> list[float]:
    """A finding as it enters a key: ``[x, y, z, diameter]`` in mm (LPS) rounded to
    :data:`MM_DECIMALS`, then the probability rounded to :data:`PROBABILITY_DECIMALS`."""
    centre = [round(float(c), MM_DECIMALS) for c in detection.centre_lps]
    return [
        *centre,
        round(float(detection.diameter_mm), MM_DECIMALS),
        round(float(detection.probability), PROBABILITY_DECIMALS),
    ]


def detections_key(detections: Sequence[Finding]) -> list[list[float]]:
    """The findings of an object in their reported order (:func:`detection_key` each)."""
    return [detection_key(d) for d in detections]


def instances_key(source: Sequence[Dataset]) -> str:
    """Digest of the source instances an object references (its evidence): the set of their
    SOPInstanceUIDs (sorted: the order files were listed in is no content), so a series that
    gained instances gives a new key."""
    uids = "\\".join(sorted(str(ds.get("SOPInstanceUID", "")) for ds in source))
    return hashlib.sha256(uids.encode()).hexdigest()


def label_key(label: Label) -> dict[str, Any]:
    """A card label as it enters a key: value, name, codes and colour."""
    return label.to_json()


def card_key(card: ModelCard) -> list[dict[str, Any]]:
    """The parts of a model card that shape an object besides its name and version: its
    labels (names, codes, colours)."""
    return [label_key(label) for label in card.labels]


def array_key(array: np.ndarray) -> str:
    """Digest of an array's shape, dtype and bytes (a label volume, masks), SHA-256 hex.
    Cost: one pass over the bytes (~0.2 s for 300 x 512 x 512 uint8)."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.shape}{array.dtype.str}".encode())
    digest.update(array.data.cast("B"))  # the array's own buffer, as memoryview(array)
    return digest.hexdigest()


def report_key(
    source: Sequence[Dataset],
    detections: Sequence[Finding],
    card: ModelCard,
    *,
    companion_seg: Dataset | None,
    settings: Mapping[str, Any] | None,
    **options: Any,
) -> str:
    """The content key of a detection report (SR).

    Args:
        source: the scored series' datasets (the report's evidence).
        detections: the reported findings, in order.
        card: the detector's card (its labels; name and version enter the UID apart).
        companion_seg: the SEG the report references, or None; its SOPInstanceUID (itself
            derived from the SEG's content) enters the key.
        settings: what chose the reported findings and the outputs, e.g.
            ``{"min_probability": 0.5, "companion_seg": True}``; None: none given.
        options: further writer arguments that show in the object (series number,
            manufacturer, procedure reported, ...), JSON-able or with a JSON-able ``repr``.
    """
    return content_key(
        findings=detections_key(detections),
        evidence=instances_key(source),
        labels=card_key(card),
        companion_seg=None if companion_seg is None else str(companion_seg.SOPInstanceUID),
        settings=jsonable(dict(settings or {})),
        options=jsonable(options),
    )


def device_uid(model_name: str, model_version: int) -> str:
    """The Device Observer UID of a model version: the same for every series it scores."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"device_uid: model_name must be a non-empty string, got {model_name!r}")
    return _derived("medssl.serving.device", model_name, str(int(model_version)))


def frame_of_reference_uid(source_series_uid: str) -> str:
    """The Frame of Reference UID medssl's outputs use for a source series that carries none
    (:mod:`medssl.dicom.source`): derived from the series UID only, so every output of
    the series (SR and SEG, any model) shares it."""
    if not isinstance(source_series_uid, str) or not source_series_uid:
        raise ValueError(
            f"frame_of_reference_uid: source_series_uid must be a non-empty "
            f"string, got {source_series_uid!r}"
        )
    return _derived("medssl.serving.frame-of-reference", source_series_uid)


def source_series_uid(source: Sequence[Dataset]) -> str:
    """The one SeriesInstanceUID shared by the datasets of a source series.

    Raises:
        ValueError: ``source`` is empty, or its datasets name no or several series.
    """
    if len(source) == 0:
        raise ValueError("source series is empty: pass the datasets of the scored CT series")
    uids = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in source}
    if len(uids) != 1 or "" in uids:
        raise ValueError(
            f"source datasets must belong to one series, got SeriesInstanceUIDs {sorted(uids)}"
        )
    return uids.pop()


def jsonable(value: Any) -> Any:
    """``value`` as it enters a content key: floats rounded (:data:`PROBABILITY_DECIMALS`),
    tuples as lists, and
    anything else JSON cannot hold as its ``repr`` (enums, dataclasses such as a Code)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return round(value, PROBABILITY_DECIMALS)
    return repr(value)
