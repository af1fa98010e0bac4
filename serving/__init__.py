"""Serving: the DICOM gateway (SCP, spool, job store, SEG/SR writers). Never imports torch.

The result writers, shared by batch scoring (``medssl-score --write-dicom``) and the gateway:

* :func:`detection_sr` / :func:`write_detection_sr`: detections as a TID 1500 Measurement
  Report (Comprehensive 3D SR), :mod:`medssl.serving.sr`;
* :func:`label_seg` / :func:`write_label_seg`: a label volume as a BINARY DICOM SEG,
  :mod:`medssl.serving.seg`;
* :func:`derived_uid`: the deterministic UIDs both use, :mod:`medssl.serving.uids`.
"""

from __future__ import annotations

from medssl.serving.seg import label_seg, write_label_seg
from medssl.serving.sr import detection_sr, write_detection_sr
from medssl.serving.uids import derived_uid

__all__ = ["derived_uid", "detection_sr", "label_seg", "write_detection_sr", "write_label_seg"]
