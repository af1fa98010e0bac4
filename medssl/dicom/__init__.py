"""DICOM result objects: what scoring and the gateway write for a series, from the model's output.

* :func:`detection_sr` / :func:`write_detection_sr`: detections as a TID 1500 Measurement
  Report (Comprehensive 3D SR), :mod:`medssl.dicom.sr`;
* :func:`label_seg` / :func:`write_label_seg`: a label volume as a DICOM SEG (BINARY with
  empty frames omitted by default; dense or LABELMAP on request), :mod:`medssl.dicom.seg`;
  :func:`detection_seg` / :func:`write_detection_seg`: the findings' companion SEG (one
  sphere segment per detection);
* :func:`save` → :class:`WrittenObject`: an object written atomically, with its kind and UIDs
  (scoring and the gateway pass these on instead of re-reading the files);
* :func:`derived_uid`: the deterministic UIDs both use, derived from each object's content,
  :mod:`medssl.dicom.uids`; :mod:`medssl.dicom.source`: the source headers as the writers
  copy them (odd archive values, no Frame of Reference UID).

Part of the torch-free core; highdicom is a core dependency.
"""

from __future__ import annotations

from medssl.dicom.seg import detection_seg, label_seg, write_detection_seg, write_label_seg
from medssl.dicom.sr import detection_sr, write_detection_sr
from medssl.dicom.uids import derived_uid
from medssl.dicom.written import WrittenObject, save

__all__ = [
    "WrittenObject",
    "derived_uid",
    "detection_seg",
    "detection_sr",
    "label_seg",
    "save",
    "write_detection_seg",
    "write_detection_sr",
    "write_label_seg",
]
