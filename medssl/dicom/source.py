r"""The source series' headers as the result writers use them: what real archives hold.

highdicom parses the patient and study attributes it copies into a new object (dates and
times into ``datetime`` values, the sex into an enumeration, names through a check that logs
the name when it looks odd), so values that real archives hold (a birth date ``00000000``,
a study date ``20230231``, a sex ``Q``) made the SR and SEG writers fail, and an odd name
reached the log. :func:`output_source` hands the writers copies of the headers in which
those attributes are empty, and :meth:`OutputSource.restore` then puts the received values
into the written object. The rule, per attribute (all Type 2 in the Patient and General
Study modules, so empty is valid):

=============================  ==============================================================
PatientName,                   copied as received when it is one value of valid PN syntax
ReferringPhysicianName         (pydicom's VR check); otherwise left empty
PatientBirthDate, StudyDate    copied as received when it has DA syntax (``YYYYMMDD`` digits,
                               month and day in range as the VR's syntax checks them), even
                               if the calendar has no such day (``20230231``: the PACS holds
                               it, and matches on it); otherwise (``00000000``, ``1958-02-14``)
                               left empty
StudyTime                      copied as received when it has TM syntax, else left empty
PatientSex                     copied when ``M``, ``F`` or ``O`` (the enumerated values);
                               otherwise left empty
=============================  ==============================================================

The six attributes, and PatientID, AccessionNumber and StudyID, are written empty when the
source lacks them (anonymisers remove Type 2 attributes; highdicom needs them present).
Values that are copied pass dciodvfy; values left empty would not (an invalid VR or an
unknown enumerated value is an error), so an output never fails validation because of what
the archive sent. The identifiers a PACS files the result by (PatientID, IssuerOfPatientID,
AccessionNumber, StudyID, the UIDs) are copied as received whatever they hold, since any
change would file it under another patient or study: an over-long one stays a dciodvfy error
the source already had. Any other patient or study attribute highdicom copies verbatim (Type 3:
PatientAge, StudyDescription, ...) is dropped from the output when its value is not valid for
its VR (pydicom's check), so it adds no error.

**Character sets.** highdicom takes the source's Specific Character Set only when every value
is one it knows, and refuses a valid ISO 2022 code-extension set whose first value is empty
(``\ISO 2022 IR 87``, common in Japanese archives) as well as unknown terms. Such a source's
outputs are written in UTF-8 (``ISO_IR 192``): pydicom decodes the received text with the
source's character set and the writer encodes it again in UTF-8, which holds any text.

**A series without a Frame of Reference UID** (LIDC-style slices) gets a derived one
(:func:`medssl.dicom.uids.frame_of_reference_uid`, from the SeriesInstanceUID only) in
the copies, so its SR and SEG can be written and share one frame of reference. Why derive
rather than skip: the SR's SCOORD3D points and the SEG's plane positions are in the
patient coordinate system the slices' ImagePositionPatient/ImageOrientationPatient
already use; the Frame of Reference UID only names that system, and PS3.3 C.7.4.1.1.1 lets
an application that creates objects in a frame of reference give it a UID (each series has
one; several series may share it). The outputs still reference the source images by SOP
Instance UID (SEG derivation images, SR evidence), which is how viewers link them. What it
does not do: a viewer that registers objects *by* Frame of Reference cannot match the
outputs to the source images (they have none to match); that is the source's defect, and
the derived UID never pretends to be the source's. Only a series in which *no* dataset has
one gets a derived UID; datasets that disagree stay an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import highdicom as hd
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.valuerep import validate_value

from medssl.dicom.uids import frame_of_reference_uid, source_series_uid

__all__ = ["PARSED_ATTRIBUTES", "UTF8", "OutputSource", "output_source"]

#: The patient and study attributes highdicom parses (and may refuse, or log): keyword -> VR.
PARSED_ATTRIBUTES: dict[str, str] = {
    "PatientName": "PN",
    "PatientBirthDate": "DA",
    "PatientSex": "CS",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "ReferringPhysicianName": "PN",
}
#: Identifiers copied as received whatever they hold (the PACS files results by them).
KEPT_AS_RECEIVED = frozenset(
    {"PatientID", "IssuerOfPatientID", "AccessionNumber", "StudyID", *PARSED_ATTRIBUTES}
)
#: Type 2 identifiers highdicom reads from the source: empty in the copies when absent.
_TYPE2_IDENTIFIERS = {"PatientID": "LO", "AccessionNumber": "SH", "StudyID": "SH"}
_SEX_VALUES = frozenset({"M", "F", "O"})
_FRAME_OF_REFERENCE = Tag("FrameOfReferenceUID")
_CHARACTER_SET = Tag("SpecificCharacterSet")
#: The Specific Character Set outputs use when highdicom does not take the source's.
UTF8 = "ISO_IR 192"
#: The SR or SEG that :meth:`OutputSource.restore` fills in and returns.
_Output = TypeVar("_Output", bound=Dataset)


@dataclass(frozen=True)
class OutputSource:
    """Headers of a source series prepared for highdicom, and what to put back.

    Attributes:
        datasets: the headers, in the given order: copies with the
            :data:`PARSED_ATTRIBUTES` empty (and a derived FrameOfReferenceUID where the
            series has none); the received datasets themselves are never changed.
        received: the :data:`PARSED_ATTRIBUTES` of the first dataset that are copied as
            received (keyword -> element); the others stay empty.
        derived_frame_of_reference: the series had no FrameOfReferenceUID and the copies
            carry a derived one.
        utf8: highdicom does not take the source's Specific Character Set; the copies (so
            the outputs) say ``ISO_IR 192`` (module docs).
    """

    datasets: list[Dataset]
    received: dict[str, DataElement]
    derived_frame_of_reference: bool
    utf8: bool = False

    def restore(self, output: _Output) -> _Output:
        """Put the received patient and study values into ``output`` (the SR or SEG built
        from :attr:`datasets`); the others are set empty; other attributes copied verbatim
        from the source with values invalid for their VR are dropped (module docs).
        Returns ``output``."""
        first = self.datasets[0]
        for element in list(output):
            tag = element.tag
            if (
                tag.group in (0x0008, 0x0010, 0x0020, 0x0032)
                and element.VR not in ("SQ", "UI")
                and element.keyword not in KEPT_AS_RECEIVED
                and tag in first
                and first[tag].value == element.value
                and not _keep(element, element.VR)
            ):
                del output[tag]
        for keyword, vr in PARSED_ATTRIBUTES.items():
            received = self.received.get(keyword)
            value = received.value if received is not None else None
            output[Tag(keyword)] = DataElement(Tag(keyword), vr, value)
        return output


def output_source(source: Sequence[Dataset]) -> OutputSource:
    """Copies of ``source`` that highdicom accepts whatever the archive sent (module docs).

    Args:
        source: the datasets (headers suffice) of one series, in frame order.

    Returns:
        The :class:`OutputSource`: copies (shallow: elements are shared, the changed ones
        replaced) and the received values to restore.

    Raises:
        ValueError: ``source`` is empty or names no or several series
            (:func:`~medssl.dicom.uids.source_series_uid`).
    """
    series_uid = source_series_uid(source)
    first = source[0]
    received = {
        keyword: first[Tag(keyword)]
        for keyword, vr in PARSED_ATTRIBUTES.items()
        if Tag(keyword) in first and _keep(first[Tag(keyword)], vr)
    }
    frames_of_reference = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in source}
    derive = frames_of_reference == {""}
    derived = frame_of_reference_uid(series_uid) if derive else None
    utf8 = not _highdicom_takes(first.get("SpecificCharacterSet"))
    copies = []
    for ds in source:
        copy = Dataset()
        copy.update(ds)
        for attribute in ("file_meta", "preamble"):
            if hasattr(ds, attribute):
                setattr(copy, attribute, getattr(ds, attribute))
        for keyword, vr in PARSED_ATTRIBUTES.items():
            copy[Tag(keyword)] = DataElement(Tag(keyword), vr, None)
        for keyword, vr in _TYPE2_IDENTIFIERS.items():
            if Tag(keyword) not in copy:  # removed by an anonymiser: empty, as Type 2 allows
                copy[Tag(keyword)] = DataElement(Tag(keyword), vr, None)
        if derived is not None:
            copy[_FRAME_OF_REFERENCE] = DataElement(_FRAME_OF_REFERENCE, "UI", derived)
        if utf8:
            copy[_CHARACTER_SET] = DataElement(_CHARACTER_SET, "CS", UTF8)
        copies.append(copy)
    return OutputSource(copies, received, derive, utf8)


def _highdicom_takes(charset: object) -> bool:
    """Whether highdicom accepts a Specific Character Set value (absent: the default)."""
    if charset is None or charset == "":
        return True
    values = [charset] if isinstance(charset, str) else list(charset)  # type: ignore[call-overload]
    try:
        for value in values:
            hd.SpecificCharacterSetValues(value)
    except ValueError:
        return False
    return True


def _keep(element: DataElement, vr: str) -> bool:
    """Whether a received value is copied as it is (module docs): valid syntax for ``vr``
    (each value; the :data:`PARSED_ATTRIBUTES` must have one), and for PatientSex an
    enumerated value. Empty values are kept (empty)."""
    value = element.value
    if value is None or value == "":
        return True
    if isinstance(value, bytes):
        return False
    if isinstance(value, (MultiValue, list, tuple)):
        return element.keyword not in PARSED_ATTRIBUTES and all(_valid(vr, v) for v in value)
    if element.keyword == "PatientSex":
        return str(value) in _SEX_VALUES
    return _valid(vr, value)


def _valid(vr: str, value: object) -> bool:
    """One value's syntax is valid for ``vr`` (pydicom's check; numbers are)."""
    if isinstance(value, (int, float)):
        return True
    try:
        validate_value(vr, str(value), config.RAISE)
    except (ValueError, TypeError):
        return False
    return True
