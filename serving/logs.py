"""Structured logs: one JSON object per line on stderr.

Fields: ``time`` (UTC ISO 8601), ``level``, ``logger``, ``message``, then every ``extra=``
field the caller gave (``study_uid``, ``job_id``, ``calling_ae``, ...). The gateway logs
UIDs, AE titles, states and reasons; it never logs patient names, IDs or other PHI, and
nothing here reads a dataset.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

__all__ = ["JsonFormatter", "configure_logging"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """A log record as one JSON line (extra fields kept, exceptions as ``error``)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send the ``medssl`` loggers' records to stderr as JSON lines at ``level``;
    pynetdicom's own (chatty, and it can dump dataset headers) are kept at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("medssl")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    net = logging.getLogger("pynetdicom")
    net.handlers[:] = [handler]
    net.setLevel(logging.WARNING)
    net.propagate = False
