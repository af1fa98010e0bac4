"""Serving: the DICOM gateway (SCP, spool, job store, SEG/SR writers). Never imports torch.

The gateway (``medssl-serve``, :class:`medssl.serving.gateway.Gateway`) is built from
:mod:`~medssl.serving.config` (YAML + environment), :mod:`~medssl.serving.scp` (C-STORE in),
:mod:`~medssl.serving.spool` (durable files), :mod:`~medssl.serving.jobstore` (SQLite job
states), :mod:`~medssl.serving.process` (a study through the shared pipeline into SR/SEG),
:mod:`~medssl.serving.sender` (C-STORE / STOW-RS out), :mod:`~medssl.serving.metrics` and
:mod:`~medssl.serving.http` (Prometheus, health) and :mod:`~medssl.serving.logs` (JSON logs).

The DICOM result objects it sends (SR, SEG, their UIDs) are written by the core,
:mod:`medssl.dicom`, which batch scoring (``medssl-score --write-dicom``) shares.
"""

from __future__ import annotations

__all__: list[str] = []
