"""A corpus of hostile DICOM datasets and garbage PDUs, made by code, each carrying planted PHI.

Not a test module: :mod:`tests.serving.test_serving_fuzz` sends the corpus to a real gateway
process,
and :mod:`tests.serving.test_serving_phi` sends single cases. Every case starts from one small
valid CT
instance (16 x 16 pixels, 1 mm voxels, Explicit VR Little Endian) that holds the patient name
:data:`PHI_NAME`, ID :data:`PHI_ID` and birth date :data:`PHI_BIRTH_DATE` (also inside a
sequence), then is damaged in one way (``kind``) or two (``combo``):

===================  ===========================================================================
kind                 what is wrong
===================  ===========================================================================
``bitflip``          1-8 random bits of the encoded dataset flipped
``truncate``         the encoded dataset cut at a random byte
``lying_length``     one element's length field too long, too short or odd
``lying_vr``         one element's VR replaced by another VR or by two garbage bytes
``huge_length``      a 32-bit length of 0x7FFFFFFF..0xFFFFFFFE on a long-VR element
``deep_sequence``    sequences nested 8-2000 deep, undefined lengths, some never delimited
``ts_mismatch``      the transfer syntax declared is not the one the bytes are encoded in
``uid``              UIDs missing, blank, invalid, too long, or path-like (``../../etc``)
``charset``          bogus Specific Character Set, ISO 2022 escapes, invalid UTF-8
``pixels``           0 or 65535 rows, odd Bits Allocated, wrong pixel data length, ...
``compressed``       encapsulated pixel data that no decoder can decode
``deflate``          corrupt or truncated deflate streams, and a moderate deflate bomb
``combo``            two of the damages above on one dataset
``companion``        not hostile: the valid second slice of a case's series (see
                     :data:`WITH_COMPANION`)
===================  ===========================================================================

A :class:`FuzzCase` is what an SCU puts on the wire: its ``body`` (the data set, as P-DATA
carries it, in its declared ``transfer_syntax``) and the request's SOP Class and SOP Instance
UIDs. :meth:`FuzzCase.part10` wraps it in a file meta header so that pynetdicom sends the
bytes as they are (``_config.STORE_SEND_CHUNKED_DATASET``).

The corpus is deterministic for a seed and takes well under a second to make.
"""

from __future__ import annotations

import copy
import functools
import random
import socket
import sqlite3
import struct
import tempfile
import threading
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from medssl.io import SeriesInfo, write_dicom_series
from tests.conftest import ramp_volume

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "KINDS",
    "NOT_SENT",
    "NO_RESPONSE",
    "PHI_BIRTH_DATE",
    "PHI_ID",
    "PHI_NAME",
    "TRANSFER_SYNTAXES",
    "WITH_COMPANION",
    "FuzzCase",
    "base_dataset",
    "encode",
    "find_phi",
    "garbage_pdus",
    "gateway_texts",
    "hostile_corpus",
    "lying_length_case",
    "phi_found",
    "send_cases",
    "send_garbage",
]

#: Planted PHI: values no log line, note, metric or error text may ever hold.
PHI_NAME = "ZZPHINAME^Q"
PHI_ID = "PHIID9876"
PHI_BIRTH_DATE = "19230517"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"

#: Every transfer syntax a case may declare (an SCU proposes one presentation context each).
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    RLELossless,
)

_ROWS = _COLUMNS = 16
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_VRS = [
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FD",
    b"FL",
    b"IS",
    b"LO",
    b"LT",
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"PN",
    b"SH",
    b"SL",
    b"SQ",
    b"SS",
    b"ST",
    b"SV",
    b"TM",
    b"UC",
    b"UI",
    b"UL",
    b"UN",
    b"UR",
    b"US",
    b"UT",
    b"UV",
]
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQ_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0"


@dataclass(frozen=True)
class FuzzCase:
    """One hostile dataset as an SCU sends it.

    Attributes:
        name: unique, ``<kind>-<n>[-detail]``.
        kind: the family (see the module docstring).
        body: the data set bytes (no file meta), as P-DATA carries them.
        transfer_syntax: the transfer syntax UID the request's presentation context declares.
        sop_class_uid: the C-STORE request's Affected SOP Class UID.
        sop_instance_uid: the request's Affected SOP Instance UID (a valid UID, even where the
            data set's own is missing or hostile).
    """

    name: str
    kind: str
    body: bytes
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str

    def part10(self) -> bytes:
        """The case as a DICOM file: preamble, file meta naming the case's UIDs and transfer
        syntax, then ``body`` byte for byte (pynetdicom sends such a file's body unparsed)."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = self.sop_class_uid
        meta.MediaStorageSOPInstanceUID = self.sop_instance_uid
        meta.TransferSyntaxUID = self.transfer_syntax
        buffer = DicomBytesIO()
        with warnings.catch_warnings():  # pydicom warns of (and quotes) a hostile UID
            warnings.simplefilter("ignore")
            write_file_meta_info(buffer, meta, enforce_standard=True)
        return b"\0" * 128 + b"DICM" + buffer.getvalue() + self.body


def find_phi(text: str | bytes) -> list[str]:
    """The planted PHI values found in ``text``: as written, lower case, split at ``^``, or
    as hex (``5a5a5048...``, with or without spaces or ``\\x``), as a warning may quote bytes."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    folded = text.lower()
    compact = folded.replace(" ", "").replace("\\x", "").replace("0x", "")
    found = []
    for value in (PHI_NAME, PHI_ID, PHI_BIRTH_DATE, PHI_NAME.split("^")[0]):
        needle = value.lower()
        if needle in folded or value.encode().hex() in compact:
            found.append(value)
    return found


@functools.lru_cache(maxsize=1)
def _template() -> Dataset:
    """One slice as medssl's own DICOM writer makes it, of the planted patient."""
    with tempfile.TemporaryDirectory() as folder:
        (path,) = write_dicom_series(
            ramp_volume(shape=(1, _ROWS, _COLUMNS), spacing=(1.0, 1.0, 1.0)),
            folder,
            SeriesInfo(
                uid_seed="fuzz",
                patient_name=PHI_NAME,
                patient_id=PHI_ID,
                patient_birth_date=PHI_BIRTH_DATE,
                accession_number="ACC1",
            ),
        )
        return dcmread(path)


def base_dataset(study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
    """A valid one-slice CT Image (16 x 16, int16, 1 mm voxels) holding the planted PHI, also
    inside a sequence (OtherPatientIDsSequence)."""
    ds = Dataset()
    for element in _template():  # copies of the elements (values are replaced, not mutated)
        ds.add(copy.copy(element))
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[series_uid, "frame"])
    other = Dataset()
    other.PatientID = PHI_ID
    other.IssuerOfPatientID = PHI_NAME
    ds.OtherPatientIDsSequence = [other]
    return ds


def encode(ds: Dataset, *, implicit_vr: bool = False, little_endian: bool = True) -> bytes:
    """``ds`` encoded as P-DATA carries it (no file meta), with no checks on its values."""
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit_vr
    buffer.is_little_endian = little_endian
    write_dataset(buffer, ds)
    return buffer.getvalue()


@dataclass(frozen=True)
class _Element:
    """One top-level element of an Explicit VR Little Endian encoding (byte offsets)."""

    offset: int
    tag: int
    vr: bytes
    length_at: int  # where the length field starts
    length_size: int  # 2 or 4
    value_at: int
    end: int  # one past the value (or the sequence delimiter)


def _elements(body: bytes) -> list[_Element]:
    """The top-level elements of a well-formed Explicit VR Little Endian ``body``."""
    out, i = [], 0
    while i + 8 <= len(body):
        group, element = struct.unpack_from("<HH", body, i)
        vr = body[i + 4 : i + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<L", body, i + 8)
            length_at, size, value_at = i + 8, 4, i + 12
        else:
            (length,) = struct.unpack_from("<H", body, i + 6)
            length_at, size, value_at = i + 6, 2, i + 8
        if length == 0xFFFFFFFF:
            end = body.index(_SEQ_END + b"\0\0\0\0", value_at) + 8
        else:
            end = value_at + length
        out.append(_Element(i, (group << 16) | element, vr, length_at, size, value_at, end))
        i = end
    return out


def _sequence(tag: int, depth: int, inner: bytes, *, delimited: bool = True) -> bytes:
    """``depth`` nested undefined-length sequences (all tagged ``tag``), ``inner`` at the bottom."""
    group, element = tag >> 16, tag & 0xFFFF
    blob = inner
    for _ in range(depth):
        item = _ITEM + b"\xff\xff\xff\xff" + blob + (_ITEM_END + b"\0\0\0\0" if delimited else b"")
        blob = (
            struct.pack("<HH", group, element)
            + b"SQ\0\0\xff\xff\xff\xff"
            + item
            + (_SEQ_END + b"\0\0\0\0" if delimited else b"")
        )
    return blob


def _phi_elements() -> bytes:
    """PatientName, PatientID and PatientBirthDate, Explicit VR Little Endian."""
    ds = Dataset()
    ds.PatientName = PHI_NAME
    ds.PatientID = PHI_ID
    ds.PatientBirthDate = PHI_BIRTH_DATE
    return encode(ds)


def _insert_before_pixels(body: bytes, blob: bytes) -> bytes:
    at = next(e.offset for e in _elements(body) if e.tag == _PIXEL_DATA)
    return body[:at] + blob + body[at:]


def _set_length(body: bytes, element: _Element, length: int) -> bytes:
    size = element.length_size
    length &= 0xFFFF if size == 2 else 0xFFFFFFFF
    packed = struct.pack("<H" if size == 2 else "<L", length)
    return body[: element.length_at] + packed + body[element.length_at + size :]


def _encapsulated(fragments: list[bytes], *, offsets: bool = False) -> bytes:
    """Encapsulated Pixel Data (7FE0,0010) OB, undefined length: Basic Offset Table, fragments."""
    table = b""
    if offsets:
        at = 0
        for fragment in fragments:
            table += struct.pack("<L", at)
            at += 8 + len(fragment) + len(fragment) % 2
    out = struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\0\0\xff\xff\xff\xff"
    out += _ITEM + struct.pack("<L", len(table)) + table
    for fragment in fragments:
        fragment += b"\0" * (len(fragment) % 2)
        out += _ITEM + struct.pack("<L", len(fragment)) + fragment
    return out + _SEQ_END + b"\0\0\0\0"


#: Kinds whose every case is followed by a valid second slice of its series (kind
#: ``companion``): a route that selects series of 2 or more slices then reads, decodes and
#: runs the model on these cases' series, and only selects (reads the headers of) the rest.
WITH_COMPANION = frozenset({"pixels", "compressed", "charset"})


class _Builder:
    """Makes the cases of one corpus: UIDs derived from the seed, one study per kind."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.cases: list[FuzzCase] = []
        self._count: dict[str, int] = {}

    def uid(self, *parts: object) -> str:
        return generate_uid(entropy_srcs=[str(self.seed), *map(str, parts)])

    def base(self, kind: str) -> tuple[Dataset, str]:
        """A fresh valid dataset in the kind's study, a series of its own; and its SOP UID."""
        n = self._count.get(kind, 0)
        sop = self.uid(kind, n, "sop")
        return base_dataset(self.uid(kind, "study"), self.uid(kind, n, "series"), sop), sop

    def add(
        self,
        kind: str,
        body: bytes,
        sop: str,
        *,
        detail: str = "",
        syntax: str = ExplicitVRLittleEndian,
        sop_class: str = CT_IMAGE_STORAGE,
    ) -> None:
        n = self._count.get(kind, 0)
        self._count[kind] = n + 1
        name = f"{kind}-{n}" + (f"-{detail}" if detail else "")
        self.cases.append(FuzzCase(name, kind, body, syntax, sop_class, sop))
        if kind in WITH_COMPANION:
            companion = base_dataset(
                self.uid(kind, "study"), self.uid(kind, n, "series"), self.uid(kind, n, "companion")
            )
            x, y, z = (float(v) for v in companion.ImagePositionPatient)
            companion.ImagePositionPatient = [x, y, z + 1.0]  # the next 1 mm slice (axial)
            companion.InstanceNumber = "2"
            self.cases.append(
                FuzzCase(
                    f"{name}-companion",
                    "companion",
                    encode(companion),
                    ExplicitVRLittleEndian,
                    CT_IMAGE_STORAGE,
                    companion.SOPInstanceUID,
                )
            )


# -- the damages, one function per kind: (builder, rng, body) -> body, for combos too ----------


def _bitflip(rng: random.Random, body: bytes) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def _truncate(rng: random.Random, body: bytes) -> bytes:
    return body[: rng.randrange(1, len(body))]


def _lying_length(rng: random.Random, body: bytes) -> bytes:
    elements = [e for e in _elements(body) if e.length_size == 2 or e.tag == _PIXEL_DATA]
    element = rng.choice(elements)
    current = element.end - element.value_at
    length = rng.choice(
        [
            current + rng.randint(1, 64),
            max(current - rng.randint(1, 8), 0),
            current + 1,
            rng.randrange(0x10000),
            0xFFFF,
            current * 3 + 7,
        ]
    )
    return _set_length(body, element, length)


def _lying_vr(rng: random.Random, body: bytes) -> bytes:
    element = rng.choice(_elements(body))
    vr = rng.choice([*_VRS, b"ZZ", b"\x00\x00", b"pn", b"\xff\xfe", b"  "])
    return body[: element.offset + 4] + vr + body[element.offset + 6 :]


def _huge_length(rng: random.Random, body: bytes) -> bytes:
    long_ones = [e for e in _elements(body) if e.length_size == 4]
    element = rng.choice(long_ones)
    return _set_length(body, element, rng.choice([0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFE, 0x80000001]))


_DAMAGES: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "bitflip": _bitflip,
    "truncate": _truncate,
    "lying_length": _lying_length,
    "lying_vr": _lying_vr,
    "huge_length": _huge_length,
}


def lying_length_case(seed: int = 0) -> FuzzCase:
    """A lying length that quotes PHI: SOPClassUID's length claims every byte up to the end of
    the PatientBirthDate value, so pydicom reads the elements between, the patient's name, ID
    and birth date among them, as one UID value and warns that it is invalid, quoting it. The
    request names the SOP class, the SOP Instance UID follows (again) after the birth date and
    the other UIDs are intact, so the SCP stores the instance and a worker reads it again."""
    b = _Builder(seed)
    ds, sop = b.base("lying_length")
    body = encode(ds)
    elements = {e.tag: e for e in _elements(body)}
    sop_class = elements[tag_for_keyword("SOPClassUID")]
    birth = elements[tag_for_keyword("PatientBirthDate")]
    # the SOPInstanceUID swallowed with the rest comes again after the birth date (out of
    # order, as pydicom reads it anyway)
    sop_instance = elements[tag_for_keyword("SOPInstanceUID")]
    again = body[sop_instance.offset : sop_instance.end]
    body = body[: birth.end] + again + body[birth.end :]
    body = _set_length(body, sop_class, birth.end - sop_class.value_at)
    b.add("lying_length", body, sop, detail="phi")
    return b.cases[0]


def _kind_simple(b: _Builder, kind: str, count: int) -> None:
    damage = _DAMAGES[kind]
    for _ in range(count):
        ds, sop = b.base(kind)
        b.add(kind, damage(b.rng, encode(ds)), sop)


def _kind_lying_length(b: _Builder, count: int) -> None:
    b.cases.append(replace(lying_length_case(b.seed), name="lying_length-phi"))
    for keyword in ("SOPInstanceUID", "StudyDate", "Modality"):  # swallow the PHI
        ds, sop = b.base("lying_length")
        body = encode(ds)
        elements = {e.tag: e for e in _elements(body)}
        element, birth = elements[tag_for_keyword(keyword)], elements[0x00100030]
        b.add(
            "lying_length",
            _set_length(body, element, birth.end - element.value_at),
            sop,
            detail=f"{keyword}-swallows",
        )
    # the elements just before the PHI: a reader out of step there quotes the PHI's bytes
    for keyword in (
        "ReferringPhysicianName",
        "Manufacturer",
        "Modality",
        "AccessionNumber",
        "StudyTime",
        "StudyDate",
    ):
        for delta in (1, 2, 3, 5, 8, 13, 21, -1, -2):
            ds, sop = b.base("lying_length")
            body = encode(ds)
            element = next(e for e in _elements(body) if e.tag == tag_for_keyword(keyword))
            length = max(element.end - element.value_at + delta, 0)
            b.add("lying_length", _set_length(body, element, length), sop, detail=keyword)
    _kind_simple(b, "lying_length", count - 54 - 3 - 1)


def _kind_deep_sequence(b: _Builder, count: int) -> None:
    depths = [8, 32, 64, 100, 200, 400, 1000, 2000]
    for i in range(count):
        ds, sop = b.base("deep_sequence")
        depth = depths[i % len(depths)]
        delimited = i % 3 != 2
        # ContentSequence (0040,A730): sorted after (0028,xxxx), before Pixel Data
        blob = _sequence(0x0040A730, depth, _phi_elements(), delimited=delimited)
        body = _insert_before_pixels(encode(ds), blob)
        if i % 5 == 4:  # the nesting runs to the end of the data: no Pixel Data after it
            body = (
                encode(ds)[: next(e.offset for e in _elements(encode(ds)) if e.tag == _PIXEL_DATA)]
                + blob[: len(blob) // 2]
            )
        b.add("deep_sequence", body, sop, detail=f"depth{depth}{'' if delimited else '-open'}")


def _kind_ts_mismatch(b: _Builder, count: int) -> None:
    variants: list[tuple[str, str, Callable[[Dataset], bytes]]] = [
        ("implicit-as-explicit", ExplicitVRLittleEndian, lambda ds: encode(ds, implicit_vr=True)),
        ("explicit-as-implicit", ImplicitVRLittleEndian, lambda ds: encode(ds)),
        ("little-as-big", ExplicitVRBigEndian, lambda ds: encode(ds)),
        ("big-as-little", ExplicitVRLittleEndian, lambda ds: encode(ds, little_endian=False)),
        ("plain-as-deflated", DeflatedExplicitVRLittleEndian, lambda ds: encode(ds)),
        (
            "deflated-as-plain",
            ExplicitVRLittleEndian,
            lambda ds: zlib.compress(encode(ds), 9)[2:-4],
        ),
        ("native-as-jpeg", JPEGBaseline8Bit, lambda ds: encode(ds)),
        ("native-as-j2k", JPEG2000Lossless, lambda ds: encode(ds)),
        ("native-as-rle", RLELossless, lambda ds: encode(ds)),
        (
            "encapsulated-as-native",
            ExplicitVRLittleEndian,
            lambda ds: _without_pixels(ds) + _encapsulated([b"\xff\xd8junk"]),
        ),
    ]
    for i in range(count):
        detail, syntax, make = variants[i % len(variants)]
        ds, sop = b.base("ts_mismatch")
        b.add("ts_mismatch", make(ds), sop, detail=detail, syntax=syntax)


def _without_pixels(ds: Dataset) -> bytes:
    copy = Dataset(ds)
    del copy.PixelData
    return encode(copy)


_BAD_UIDS = [
    "../../etc",
    "1.2/../3",
    "..",
    ".",
    "/etc/passwd",
    "1.2.3\\..\\4",
    "1.2.3\x00.4",
    "~root",
    "1.2.3/",
    "abc",
    "1.2.03.4",
    "1..2",
    "1.2.3.",
    "",
    " ",
    "9" * 65,
    "1.2." + "3" * 200,
    "1.2.840.10008.1.2",
    "\u00e9.1",
    "1.2\n3",
    "*",
    "1.2.3 .4",
    PHI_NAME,
    PHI_ID,
    f"1.2.{PHI_BIRTH_DATE}.{PHI_ID}",
]


def _kind_uid(b: _Builder, count: int) -> None:
    keywords = [
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
        "SOPClassUID",
    ]
    # the C-STORE request's own Affected SOP Instance UID is no UID (the data set's agrees)
    for value in (PHI_ID, PHI_NAME, "1.2.3/../../etc"):
        ds, _ = b.base("uid")
        ds.SOPInstanceUID = "1.2.3"  # replaced below, unchecked
        body = _set_raw(
            encode(ds),
            tag_for_keyword("SOPInstanceUID"),
            b"UI",
            value.encode() + b"\0" * (len(value) % 2),
        )
        b.add("uid", body, value, detail="request-uid")
    for i in range(count - 3):
        ds, sop = b.base("uid")
        keyword = keywords[i % len(keywords)]
        if i % 7 == 6:
            delattr(ds, keyword)
            body, detail = encode(ds), f"no-{keyword}"
        else:
            value = _BAD_UIDS[(i // len(keywords)) % len(_BAD_UIDS)].encode()
            value += b"\0" * (len(value) % 2)
            body = _set_raw(encode(ds), tag_for_keyword(keyword), b"UI", value)
            detail = f"bad-{keyword}"
        b.add("uid", body, sop, detail=detail)


_CHARSET_NAMES = [
    b"ISO_IR 999",
    b"",
    b"\\\\",
    b"GB18030\\ISO 2022 IR 87",
    b"ISO 2022 IR 149",
    b"ISO_IR 192",
    b"ISO_IR 13\\ISO 2022 IR 87",
    b"ISO 2022 IR 6\\ISO 2022 IR 100",
    b"\xff\xfe",
    b"ISO_IR 100\\\\\\\\",
    b"UTF-8",
    b"ISO 2022 IR 58\\ISO 2022 IR 159",
]
_NAME_BYTES = [
    PHI_NAME.encode(),
    PHI_NAME.encode() + b"\xff\xfe\xc3\x28",  # invalid UTF-8
    PHI_NAME.encode() + b"=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B",  # ISO 2022 IR 87 escapes
    PHI_NAME.encode() + b"\x1b$)C\xc1\xa4",  # an escape to a set never declared
    PHI_NAME.encode() + b"\x1b",  # a truncated escape
    b"\x1b$B" + PHI_NAME.encode(),  # PHI inside a multi-byte set
    PHI_NAME.encode() + b"\xc0\x80\xed\xa0\x80",  # overlong and surrogate UTF-8
]


def _kind_charset(b: _Builder, count: int) -> None:
    for i in range(count):
        ds, sop = b.base("charset")
        charset = _CHARSET_NAMES[i % len(_CHARSET_NAMES)]
        name = _NAME_BYTES[(i // len(_CHARSET_NAMES) + i) % len(_NAME_BYTES)]
        body = encode(ds)
        for element in reversed(_elements(body)):  # replace from the end: offsets stay valid
            if element.tag == 0x00080005:
                value = charset + b" " * (len(charset) % 2)
                body = (
                    body[: element.length_at]
                    + struct.pack("<H", len(value))
                    + value
                    + body[element.end :]
                )
            elif element.tag == 0x00100010:
                value = name + b" " * (len(name) % 2)
                body = (
                    body[: element.length_at]
                    + struct.pack("<H", len(value))
                    + value
                    + body[element.end :]
                )
        b.add("charset", body, sop, detail=f"cs{i % len(_CHARSET_NAMES)}")


_PIXEL_VARIANTS: list[tuple[str, dict[str, object], int | None]] = [
    # (detail, attribute changes, pixel data length or None to keep it)
    ("rows0", {"Rows": 0}, None),
    ("columns0", {"Columns": 0}, None),
    ("rows65535", {"Rows": 65535}, None),
    ("rows-cols65535", {"Rows": 65535, "Columns": 65535}, None),
    ("bits0", {"BitsAllocated": 0}, None),
    ("bits1", {"BitsAllocated": 1}, None),
    ("bits7", {"BitsAllocated": 7, "BitsStored": 7, "HighBit": 6}, None),
    ("bits12", {"BitsAllocated": 12, "BitsStored": 12, "HighBit": 11}, None),
    ("bits13", {"BitsAllocated": 13}, None),
    ("bits24", {"BitsAllocated": 24}, None),
    ("bits64", {"BitsAllocated": 64, "BitsStored": 64, "HighBit": 63}, None),
    ("bits65535", {"BitsAllocated": 65535}, None),
    ("stored-gt-allocated", {"BitsStored": 32, "HighBit": 31}, None),
    ("highbit-odd", {"HighBit": 40}, None),
    ("samples3", {"SamplesPerPixel": 3}, None),
    ("samples0", {"SamplesPerPixel": 0}, None),
    ("frames0", {"NumberOfFrames": "0"}, None),
    ("frames-neg", {"NumberOfFrames": "-1"}, None),
    ("frames-huge", {"NumberOfFrames": "99999999"}, None),
    ("frames-text", {"NumberOfFrames": "abc"}, None),
    ("pixrep7", {"PixelRepresentation": 7}, None),
    ("photometric-bogus", {"PhotometricInterpretation": "PALETTE COLOR"}, None),
    ("short-pixels", {}, 100),
    ("odd-pixels", {}, 511),
    ("long-pixels", {}, 4096),
    ("no-pixels", {}, 0),
    ("rows-smaller", {"Rows": 8}, None),
    ("spacing0", {"PixelSpacing": ["0", "0"]}, None),
    ("spacing-neg", {"PixelSpacing": ["-1", "1"]}, None),
    ("spacing-text", {"PixelSpacing": ["a", "b"]}, None),
    ("spacing-huge", {"PixelSpacing": ["1000", "1000"]}, None),
    ("orientation-short", {"ImageOrientationPatient": ["1"]}, None),
    ("orientation-zero", {"ImageOrientationPatient": ["0"] * 6}, None),
    ("position-nan", {"ImagePositionPatient": ["nan", "inf", "-inf"]}, None),
    ("slope0", {"RescaleSlope": "0"}, None),
    ("slope-text", {"RescaleSlope": "x"}, None),
]


def _raw_value(vr: bytes, value: object) -> bytes:
    """``value`` as the bytes of an element of ``vr``, unchecked (US: uint16; text VRs: the
    values joined by ``\\``, padded to even length)."""
    if vr == b"US":
        return struct.pack("<H", int(value) & 0xFFFF)  # type: ignore[call-overload]
    values = value if isinstance(value, list) else [value]
    text = "\\".join(str(v) for v in values).encode()
    return text + b" " * (len(text) % 2)


def _set_raw(body: bytes, tag: int, vr: bytes, value: bytes) -> bytes:
    """``body`` with the short-VR element ``tag`` holding ``value`` (added in tag order when
    missing), whatever the value is."""
    element = (
        struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(value)) + value
    )
    for e in _elements(body):
        if e.tag == tag:
            return body[: e.offset] + element + body[e.end :]
        if e.tag > tag:
            return body[: e.offset] + element + body[e.offset :]
    return body + element


_PIXEL_VRS = {
    "Rows": b"US",
    "Columns": b"US",
    "BitsAllocated": b"US",
    "BitsStored": b"US",
    "HighBit": b"US",
    "SamplesPerPixel": b"US",
    "PixelRepresentation": b"US",
    "NumberOfFrames": b"IS",
    "PhotometricInterpretation": b"CS",
    "PixelSpacing": b"DS",
    "ImageOrientationPatient": b"DS",
    "ImagePositionPatient": b"DS",
    "RescaleSlope": b"DS",
}


def _kind_pixels(b: _Builder, count: int) -> None:
    for i in range(count):
        detail, changes, length = _PIXEL_VARIANTS[i % len(_PIXEL_VARIANTS)]
        ds, sop = b.base("pixels")
        if length is not None:
            if length == 0:
                del ds.PixelData
            else:
                ds.PixelData = bytes(b.rng.randrange(256) for _ in range(length))
        body = encode(ds)
        for keyword, value in changes.items():
            vr = _PIXEL_VRS[keyword]
            body = _set_raw(body, tag_for_keyword(keyword), vr, _raw_value(vr, value))
        b.add("pixels", body, sop, detail=detail)


def _kind_compressed(b: _Builder, count: int) -> None:
    syntaxes = [
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEG2000Lossless,
        JPEG2000,
        HTJ2KLossless,
        RLELossless,
    ]
    for i in range(count):
        syntax = syntaxes[i % len(syntaxes)]
        rng = b.rng
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(8, 600)))
        fragment = [
            junk,
            b"\xff\xd8\xff\xc0\x00\x11\x08" + junk,  # a JPEG SOF, then noise
            b"\xff\x4f\xff\x51\x00\x29" + junk,  # a J2K codestream header, then noise
            struct.pack("<16L", 15, *([64] * 15)) + junk,  # an RLE header lying
            PHI_NAME.encode() * 4,  # text where a codestream belongs
        ][(i // len(syntaxes)) % 5]
        ds, sop = b.base("compressed")
        if syntax in (JPEGBaseline8Bit, JPEGExtended12Bit) and i % 2:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        body = _without_pixels(ds) + _encapsulated([fragment], offsets=bool(i % 2))
        b.add("compressed", body, sop, detail=syntax.name.replace(" ", ""), syntax=syntax)


#: Inflated size of the deflate bomb case: moderate (the gateway bounds what it inflates).
DEFLATE_BOMB_BYTES = 48 * 1024 * 1024


def _deflated(data: bytes) -> bytes:
    """Raw deflate (no zlib header), as Deflated Explicit VR Little Endian carries a data set."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def _kind_deflate(b: _Builder, count: int) -> None:
    for i in range(count):
        ds, sop = b.base("deflate")
        body = encode(ds)
        variant = i % 5
        if variant == 0:  # a valid one, for reference
            out, detail = _deflated(body), "valid"
        elif variant == 1:
            out, detail = _deflated(body)[: b.rng.randrange(4, 200)], "truncated"
        elif variant == 2:
            out, detail = bytes(b.rng.randrange(256) for _ in range(300)), "garbage"
        elif variant == 3:
            out, detail = _bitflip(b.rng, _deflated(body)), "bitflip"
        else:  # zeros in a private OB element before the pixels: inflates to DEFLATE_BOMB_BYTES
            blob = (
                struct.pack("<HH", 0x0099, 0x1001)
                + b"OB\0\0"
                + struct.pack("<L", DEFLATE_BOMB_BYTES)
            )
            compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
            head = body[: next(e.offset for e in _elements(body) if e.tag == _PIXEL_DATA)]
            out = compressor.compress(head + blob)
            chunk = bytes(1 << 20)
            for _ in range(DEFLATE_BOMB_BYTES >> 20):
                out += compressor.compress(chunk)
            out += compressor.compress(body[len(head) :]) + compressor.flush()
            detail = "bomb"
        b.add("deflate", out, sop, detail=detail, syntax=DeflatedExplicitVRLittleEndian)


def _kind_combo(b: _Builder, count: int) -> None:
    names = list(_DAMAGES)
    for _ in range(count):
        ds, sop = b.base("combo")
        first, second = b.rng.sample(names, 2)
        body = _DAMAGES[first](b.rng, encode(ds))
        try:
            body = _DAMAGES[second](b.rng, body)
        except (ValueError, IndexError, struct.error):  # the first damage left no element to find
            body = _bitflip(b.rng, body)
        b.add("combo", body, sop, detail=f"{first}+{second}")


#: The families and their sizes in :func:`hostile_corpus` (1,110 cases in all).
KINDS: dict[str, int] = {
    "bitflip": 250,
    "truncate": 100,
    "lying_length": 120,
    "lying_vr": 100,
    "huge_length": 40,
    "deep_sequence": 40,
    "ts_mismatch": 50,
    "uid": 70,
    "charset": 60,
    "pixels": 80,
    "compressed": 60,
    "deflate": 10,
    "combo": 130,
}


def hostile_corpus(seed: int = 17) -> list[FuzzCase]:
    """The whole corpus (see the module docstring): :data:`KINDS` cases per family,
    deterministic for ``seed``, with one study per family and one series per case.

    Every case but ``deflate``'s holds the planted PHI in its bytes as sent; the
    ``companion`` cases come on top of the :data:`KINDS` counts."""
    b = _Builder(seed)
    for kind, count in KINDS.items():
        if kind in _DAMAGES and kind != "lying_length":
            _kind_simple(b, kind, count)
        else:
            {
                "lying_length": _kind_lying_length,
                "deep_sequence": _kind_deep_sequence,
                "ts_mismatch": _kind_ts_mismatch,
                "uid": _kind_uid,
                "charset": _kind_charset,
                "pixels": _kind_pixels,
                "compressed": _kind_compressed,
                "deflate": _kind_deflate,
                "combo": _kind_combo,
            }[kind](b, count)
    return b.cases


def garbage_pdus(seed: int = 17, count: int = 40) -> list[bytes]:
    """Byte strings an attacker writes to the SCP's port instead of a real A-ASSOCIATE-RQ:
    random bytes, PDU headers whose length lies (0, huge), unknown PDU types, P-DATA and
    A-RELEASE outside an association, an A-ASSOCIATE-RQ cut short or with lying item lengths.
    Each holds the planted PHI where a value could sit."""
    rng = random.Random(seed)
    phi = (PHI_NAME + PHI_ID + PHI_BIRTH_DATE).encode()
    called, calling = b"MEDSSL".ljust(16), b"STORESCU".ljust(16)
    rq_body = b"\x00\x01\x00\x00" + called + calling + b"\0" * 32
    app = b"\x10\x00\x00\x15" + b"1.2.840.10008.3.1.1.1"
    pdus = [
        b"\x01\x00" + struct.pack(">L", len(rq_body) + len(app)) + rq_body + app[:10],  # cut short
        b"\x01\x00" + struct.pack(">L", 0xFFFFFFFF) + rq_body,  # huge length
        b"\x01\x00" + struct.pack(">L", 0),  # zero length
        b"\x01\x00" + struct.pack(">L", len(rq_body) + 8) + rq_body + b"\x20\x00\xff\xff" + phi[:4],
        b"\x04\x00"
        + struct.pack(">L", 6 + len(phi))
        + struct.pack(">L", 2 + len(phi))
        + b"\x01\x03"
        + phi,  # P-DATA without an association
        b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # A-RELEASE-RQ without an association
        b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00",  # A-ABORT without an association
        b"\xff\x00" + struct.pack(">L", len(phi)) + phi,  # unknown type
        b"\x01",  # a header cut short
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Patient: " + phi + b"\r\n\r\n",
    ]
    while len(pdus) < count:
        size = rng.randint(1, 400)
        junk = bytes(rng.randrange(256) for _ in range(size))
        at = rng.randrange(len(junk))
        pdus.append(
            bytes([rng.choice([1, 2, 3, 4, 5, 6, 7, 0, 8, 0x41])]) + junk[:at] + phi + junk[at:]
        )
    return pdus


# -- sending the corpus and reading back what the gateway wrote ------------------------------

#: What :func:`send_cases` records for a case whose C-STORE got no response (the association
#: was aborted or timed out), and for one that could not be sent (no presentation context).
NO_RESPONSE = -1
NOT_SENT = -2


def send_cases(
    port: int,
    cases: list[FuzzCase],
    folder: Path,
    *,
    calling_ae: str = "STORESCU",
    called_ae: str = "MEDSSL",
    timeout_s: float = 30.0,
) -> dict[str, int]:
    """C-STORE every case's bytes as they are to ``127.0.0.1:port``; the status of each.

    One association proposes CT Image Storage in every :data:`TRANSFER_SYNTAXES` (one
    presentation context each), so each case goes in the transfer syntax it declares; the
    cases are written to ``folder`` as Part 10 files and sent unparsed (pynetdicom's chunked
    sending). An association that ends (aborted by the SCP, timed out) is opened again for
    the next case.

    Returns:
        ``{case.name: status}``: the DICOM status of the response, :data:`NO_RESPONSE` or
        :data:`NOT_SENT`.
    """
    import pynetdicom
    from pynetdicom import AE, _config

    folder.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout_s
    for syntax in TRANSFER_SYNTAXES:
        ae.add_requested_context(CT_IMAGE_STORAGE, [syntax])
    statuses: dict[str, int] = {}
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc: pynetdicom.association.Association | None = None
    try:
        for case in cases:
            path = folder / f"{case.name}.dcm"
            path.write_bytes(case.part10())
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
                if not assoc.is_established:
                    raise AssertionError(
                        f"the SCP on port {port} refused the association before case {case.name}"
                    )
            try:
                with warnings.catch_warnings():  # pydicom warns of (and quotes) a hostile UID
                    warnings.simplefilter("ignore")
                    response = assoc.send_c_store(path)
            except ValueError:  # no accepted presentation context for its transfer syntax
                statuses[case.name] = NOT_SENT
                continue
            statuses[case.name] = int(response.Status) if "Status" in response else NO_RESPONSE
            path.unlink()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc is not None and assoc.is_established:
            assoc.release()
        ae.shutdown()
    return statuses


def send_garbage(port: int, pdus: list[bytes], *, read_s: float = 1.0) -> list[bytes]:
    """Write each of ``pdus`` on a new TCP connection to ``127.0.0.1:port`` (all at once, one
    thread each), read for up to ``read_s`` seconds, close. What came back on each connection
    (empty if nothing came before the SCP closed it or the time was up)."""
    answers: list[bytes] = [b""] * len(pdus)

    def one(i: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            try:
                sock.sendall(pdus[i])
                sock.settimeout(read_s)
                answers[i] = sock.recv(4096)
            except OSError:  # reset by the SCP, or nothing within read_s: both are answers
                pass

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(pdus))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return answers


def gateway_texts(log: Path, spool: Path, metrics: str) -> dict[str, str]:
    """Every text a gateway wrote that is not a DICOM object: its log (stdout + stderr), the
    quarantine notes, the job store (an SQL dump of every table) and the ``/metrics`` body;
    ``{where: text}``. The spooled and quarantined ``.dcm`` files are the input as received
    and the outputs copy the patient module by design, so they are not in it."""
    texts = {"log": log.read_text(errors="replace"), "metrics": metrics}
    for note in sorted((spool / "quarantine").glob("*.json")):
        texts[f"quarantine/{note.name}"] = note.read_text(errors="replace")
    database = spool / "jobs.sqlite"
    if database.exists():
        db = sqlite3.connect(database, timeout=10)
        try:
            texts["jobs.sqlite"] = "\n".join(db.iterdump())
        finally:
            db.close()
    return texts


def phi_found(texts: dict[str, str]) -> dict[str, list[str]]:
    """``{where: [lines holding planted PHI]}`` over :func:`gateway_texts`' output (the
    lines cut to 300 characters); empty when no PHI is anywhere."""
    found: dict[str, list[str]] = {}
    for where, text in texts.items():
        lines = [line[:300] for line in text.splitlines() if find_phi(line)]
        if lines:
            found[where] = lines
    return found
