"""Structured logs: one JSON object per line on stderr, and nothing else on it.

Fields: ``time`` (UTC ISO 8601), ``level``, ``logger``, ``message``, then every ``extra=``
field the caller gave (``study_uid``, ``job_id``, ``calling_ae``, ...). The gateway logs
UIDs, AE titles, states and reasons; it never logs patient names, IDs or other PHI, and
nothing here reads a dataset.

Text that medssl did not write may quote a dataset's bytes: pydicom's warnings and log
records quote the raw value of an element it cannot read ("Invalid value for VR UI:
'...'"), and exception messages of libraries quote what they failed on. A hostile or
damaged dataset can put the patient's name, ID and birth date there. So once
:func:`configure_logging` has run, every way text reaches the process's output goes through
:class:`JsonFormatter`, which keeps what a library says only as its *type*:

============================================  ===================================================
source                                        what the log line keeps
============================================  ===================================================
``medssl.*`` loggers                          message and extras (medssl's own words); an
                                              attached exception as :func:`safe_traceback`
other libraries' loggers (pydicom,            level, logger, the source location
pynetdicom, highdicom, PIL, urllib3,          (``module:line``) and the exception type; the
onnxruntime, the root logger...)              message is withheld
``warnings.warn`` (any module)                the category and the warning's source location,
                                              logger ``medssl.warnings``; the text is withheld
an uncaught exception (main thread, any       :func:`safe_traceback`, logger ``medssl.uncaught``
thread, ``unraisable``)
``print`` to ``sys.stdout``/``sys.stderr``    with :func:`capture_stray_output`: one record per
                                              line written, its text withheld (``medssl.stray``)
============================================  ===================================================

:func:`safe_error` is the one way the gateway turns an exception into stored text (the job
store's ``error``, a quarantine note, a log field): medssl's own errors keep their message,
any other exception only its type and where it was raised. :func:`loggable_uid` keeps a UID a
peer sent only when it is one. Text that C libraries write straight to file descriptor 2
(decoders, onnxruntime) is not Python's to see; ``tests/serving/test_serving_fuzz.py`` checks the
gateway process's whole output, descriptor 2 included.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
import traceback
import warnings
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, TextIO

from medssl.errors import describe_error

__all__ = [
    "JsonFormatter",
    "capture_stray_output",
    "configure_logging",
    "loggable_uid",
    "safe_error",
    "safe_traceback",
]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

#: Library loggers that get their own level (their records are withheld text either way):
#: pydicom logs every warning it also raises with ``warnings.warn`` (kept once, as a warning),
#: pynetdicom is chatty below WARNING and dumps dataset headers at DEBUG.
LIBRARY_LEVELS = {"pydicom": logging.ERROR, "pynetdicom": logging.WARNING}

_OURS = "medssl"


_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def loggable_uid(value: object) -> str:
    """``value`` if it is a well-formed DICOM UID (digits and dots, at most 64 characters: no
    name fits in one), else a placeholder that quotes nothing of it. For UIDs a peer sent
    (a C-STORE request's Affected SOP Instance UID) before they are logged or written into a
    quarantine note: a hostile or broken sender may put anything there."""
    text = str(value)
    if len(text) <= 64 and _UID.fullmatch(text):
        return text
    return f"(not a UID: {len(text)} characters, not quoted)"


def safe_error(exc: BaseException) -> str:
    """``exc`` as text that quotes no dataset value: ``"Type: message"`` for medssl's own
    errors (:class:`~medssl.errors.MedsslError`, whose messages name paths, UIDs and what was
    wrong, never patient data), ``"Type at file.py:line"`` for any other exception (pydicom's,
    numpy's, a decoder's messages may quote the bytes they failed on). The one rule
    (:func:`medssl.errors.describe_error`) that the scorer's rows follow too."""
    return describe_error(exc)


def safe_traceback(exc: BaseException) -> str:
    """A traceback of ``exc`` and its causes (``raise ... from``, ``during handling``) whose
    frames are kept (file, line, function, source line: code, not data) and whose exception
    lines are :func:`safe_error`: library messages and ``__notes__`` are dropped."""
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = (
                current.__cause__,
                ("The above exception was the direct cause of the following exception:"),
            )
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = (
                current.__context__,
                ("During handling of the above exception, another exception occurred:"),
            )
        else:
            current = None
    parts: list[str] = []
    for item, next_link in reversed(chain):
        if item.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_list(traceback.extract_tb(item.__traceback__)))
        parts.append(safe_error(item) + "\n")
        if next_link:
            parts.append(f"\n{next_link}\n\n")
    return "".join(parts).rstrip("\n")


def _ours(record: logging.LogRecord) -> bool:
    return record.name == _OURS or record.name.startswith(_OURS + ".")


class JsonFormatter(logging.Formatter):
    """A log record as one JSON line (extra fields kept, exceptions as ``error``).

    Records of medssl's loggers keep their message; an attached exception becomes
    :func:`safe_traceback`. Records of any other logger keep only the level, the logger, the
    source location and the exception type: their message is withheld (see the module
    docstring), as a pydicom or pynetdicom message may quote a dataset's bytes.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
        }
        exc = record.exc_info[1] if record.exc_info else None
        if _ours(record):
            out["message"] = record.getMessage()
            out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
            if exc is not None:
                out["error"] = safe_traceback(exc)
        else:
            out["message"] = "library message withheld (it may quote DICOM values)"
            out["source"] = f"{record.module}:{record.lineno}"
            if exc is not None:
                out["error_type"] = type(exc).__name__
        return json.dumps(out, default=str)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning``: a ``medssl.warnings`` record with the category and where the
    warning was raised; the warning's text is withheld."""
    module = filename.rsplit("/", 1)[-1]
    logging.getLogger("medssl.warnings").warning(
        "%s at %s:%d (text withheld: it may quote DICOM values)",
        category.__name__,
        module,
        lineno,
        extra={"category": category.__name__},
    )


def _log_uncaught(exc: BaseException, where: str) -> None:
    logging.getLogger("medssl.uncaught").error(
        "uncaught %s in %s", type(exc).__name__, where, extra={"error": safe_traceback(exc)}
    )


def _excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    _log_uncaught(exc.with_traceback(tb), "the main thread")


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or isinstance(args.exc_value, SystemExit):
        return
    name = args.thread.name if args.thread is not None else "a thread"
    _log_uncaught(args.exc_value, f"thread {name}")


def _unraisable_hook(unraisable: Any) -> None:
    if unraisable.exc_value is not None:
        _log_uncaught(unraisable.exc_value, "an unraisable context (a finaliser or callback)")


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Make ``stream`` (default: stderr) carry only :class:`JsonFormatter` lines.

    * the ``medssl`` loggers log at ``level``;
    * the root logger (every library logger propagates to it) logs WARNING and above, with
      :data:`LIBRARY_LEVELS` for pydicom and pynetdicom; their text is withheld;
    * ``warnings`` are shown as ``medssl.warnings`` records (category and location only),
      each source location once (the ``default`` action);
    * uncaught exceptions (``sys.excepthook``, ``threading.excepthook``,
      ``sys.unraisablehook``) are logged as ``medssl.uncaught`` with :func:`safe_traceback`.

    Returns:
        The handler (for a caller that wants to remove it again).
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    ours = logging.getLogger(_OURS)
    ours.handlers[:] = [handler]
    ours.setLevel(level)
    ours.propagate = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name, library_level in LIBRARY_LEVELS.items():
        library = logging.getLogger(name)
        library.handlers[:] = []
        library.setLevel(library_level)
        library.propagate = True
    warnings.showwarning = _show_warning
    warnings.simplefilter("default")
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisable_hook
    return handler


class _StrayOutput(io.TextIOBase):
    """A text stream in place of ``sys.stdout``/``sys.stderr``: each line written becomes a
    ``medssl.stray`` record saying how many characters were withheld."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._pending = 0
        self._lock = threading.Lock()
        self._logger = logging.getLogger("medssl.stray")

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = []
        with self._lock:
            for piece in text.splitlines(keepends=True):
                self._pending += len(piece.rstrip("\n"))
                if piece.endswith("\n"):
                    lines.append(self._pending)
                    self._pending = 0
        for n in lines:
            self._logger.warning(
                "a line of %d characters written to %s, withheld (it may quote DICOM values)",
                n,
                self.name,
                extra={"stream": self.name},
            )
        return len(text)

    def flush(self) -> None:
        with self._lock:
            n, self._pending = self._pending, 0
        if n:
            self._logger.warning(
                "%d characters written to %s, withheld (it may quote DICOM values)",
                n,
                self.name,
                extra={"stream": self.name},
            )


def capture_stray_output() -> TextIO:
    """Replace ``sys.stdout`` and ``sys.stderr`` by streams that log each line a library
    prints as a withheld ``medssl.stray`` record; return the original stderr, which
    :func:`configure_logging` should then write to. For a service process (``medssl-serve``),
    not for a test run that captures output itself."""
    original = sys.stderr
    logging.raiseExceptions = False  # a failing handler must not print (into itself) either
    sys.stdout = _StrayOutput("stdout")  # type: ignore[assignment]
    sys.stderr = _StrayOutput("stderr")  # type: ignore[assignment]
    return original
