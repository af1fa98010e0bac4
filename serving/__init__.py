"""Serving: the DICOM gateway (SCP, spool, job store, SEG/SR writers). Never imports torch.

The gateway (``medssl-serve``, :class:`medssl.serving.gateway.Gateway`) is built from
:mod:`~medssl.serving.config` (YAML + environment), :mod:`~medssl.serving.scp` (C-STORE in),
:mod:`~medssl.serving.spool` (durable files), :mod:`~medssl.serving.jobstore` (SQLite job
states), :mod:`~medssl.serving.process` (a study through the shared pipeline into SR/SEG),
:mod:`~medssl.serving.sender` (C-STORE / STOW-RS out), :mod:`~medssl.serving.metrics` and
:mod:`~medssl.serving.http` (Prometheus, health) and :mod:`~medssl.serving.logs` (JSON logs).

The result writers, shared by batch scoring (``medssl-score --write-dicom``) and the gateway:

* :func:`detection_sr` / :func:`write_detection_sr`: detections as a TID 1500 Measurement
  Report (Comprehensive 3D SR), :mod:`medssl.serving.sr`;
* :func:`label_seg` / :func:`write_label_seg`: a label volume as a DICOM SEG (BINARY with
  empty frames omitted by default; dense or LABELMAP on request), :mod:`medssl.serving.seg`;
  :func:`detection_seg` / :func:`write_detection_seg`: the findings' companion SEG (one
  sphere segment per detection);
* :func:`derived_uid`: the deterministic UIDs both use, derived from each object's content,
  :mod:`medssl.serving.uids`; :mod:`medssl.serving.source`: the source headers as the
  writers copy them (odd archive values, no Frame of Reference UID).
"""

from __future__ import annotations

from medssl.serving.seg import detection_seg, label_seg, write_detection_seg, write_label_seg
from medssl.serving.sr import detection_sr, write_detection_sr
from medssl.serving.uids import derived_uid

__all__ = ["derived_uid", "detection_seg", "detection_sr", "label_seg", "write_detection_seg", "write_detection_sr",
           "write_label_seg"]
