"""No patient-identifying value in anything the gateway writes besides DICOM.

A dataset whose lying length makes pydicom quote the patient's name, ID and birth date in its
warnings goes through a real ``medssl-serve`` process; its log, quarantine notes, job store and
metrics must not hold them. The formatter's rules are checked on their own too.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings

import pydicom
import pytest

from medssl.errors import CorruptFileError
from medssl.serving.logs import JsonFormatter, loggable_uid, safe_error, safe_traceback
from tests.fuzz_corpus import (
    PHI_ID,
    PHI_NAME,
    find_phi,
    gateway_texts,
    lying_length_case,
    phi_found,
    send_cases,
)
from tests.serving.helpers import fuzz_gateway, wait_settled

pytestmark = [pytest.mark.integration]


def _record(name: str, message: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord(name, logging.WARNING, __file__, 1, message, (), exc_info)


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001 - the point is to get its traceback
        return caught


def test_library_records_keep_their_type_and_place_but_not_their_text():
    formatter = JsonFormatter()
    quoted = f"Invalid value for VR UI: '1.2\\x00{PHI_NAME}{PHI_ID}'"
    library = json.loads(formatter.format(_record("pydicom", quoted, _raised(ValueError(quoted)))))
    ours = json.loads(formatter.format(_record("medssl.serving.scp", "instance refused (no UID)")))
    assert not find_phi(json.dumps(library))
    assert library["error_type"] == "ValueError" and library["logger"] == "pydicom"
    assert library["source"].startswith("test_serving_phi:")
    assert ours["message"] == "instance refused (no UID)"


def test_tracebacks_and_stored_errors_keep_medssl_messages_and_only_the_type_of_others():
    try:
        try:
            pydicom.valuerep.IS(PHI_ID)  # a ValueError quoting the value
        except Exception as exc:
            raise CorruptFileError("/spool/x.dcm", "truncated or malformed DICOM") from exc
    except CorruptFileError as exc:
        text = safe_traceback(exc)
        error = safe_error(exc)
        cause = exc.__cause__
    assert find_phi(str(cause))  # pydicom's own message quotes the value
    assert not find_phi(text) and not find_phi(safe_error(cause))
    assert "The above exception was the direct cause" in text
    assert "valuerep.IS(PHI_ID)" in text  # the frames are kept
    assert error == "CorruptFileError: /spool/x.dcm: truncated or malformed DICOM"
    assert safe_error(cause).startswith(f"{type(cause).__name__} at valuerep.py:")


def test_only_well_formed_uids_from_a_peer_are_logged():
    assert loggable_uid("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    for hostile in (PHI_ID, PHI_NAME, "../../etc", "1.2." + "3" * 70, "1.02.3", ""):
        assert not find_phi(loggable_uid(hostile)) and "not a UID" in loggable_uid(hostile)


def test_warnings_are_logged_with_their_category_only(monkeypatch):
    """configure_logging's warnings hook (called as warnings.warn calls it)."""
    from medssl.serving import logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("medssl.warnings")
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "propagate", False)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", logs._show_warning)
        warnings.warn(f"Invalid value for VR PN: '{PHI_NAME}'", UserWarning, stacklevel=1)
    line = json.loads(stream.getvalue())
    assert not find_phi(stream.getvalue())
    assert line["category"] == "UserWarning" and line["logger"] == "medssl.warnings"


def test_stray_prints_are_withheld(monkeypatch):
    from medssl.serving import logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("medssl.stray")
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "propagate", False)
    stray = logs._StrayOutput("stderr")
    print(f"Exception ignored in: <PN '{PHI_NAME}'>", file=stray)
    stray.write(PHI_ID)
    stray.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert not find_phi(stream.getvalue())
    assert [line["stream"] for line in lines] == ["stderr", "stderr"]


def test_a_lying_length_dataset_leaves_no_phi_in_any_gateway_output(tmp_path):
    """A regression: the planted name, ID and birth date once appeared 11-14 times in the log."""
    case = lying_length_case()
    with warnings.catch_warnings(record=True) as seen:  # the case does make pydicom quote PHI
        warnings.simplefilter("always")
        ds = pydicom.dcmread(io.BytesIO(case.part10()))
        for _ in ds.iterall():
            pass
    assert any(find_phi(str(w.message)) for w in seen)
    gateway = fuzz_gateway(tmp_path / "gw")
    gateway.start()
    try:
        statuses = send_cases(gateway.port, [case], tmp_path / "sent")
        jobs = wait_settled(gateway)
        metrics = gateway.http_get("/metrics")[1]
    finally:
        gateway.stop()
    assert statuses == {case.name: 0x0000}  # stored: the worker read it too
    assert len(jobs) == 1
    texts = gateway_texts(gateway.log, gateway.spool, metrics)
    assert phi_found(texts) == {}
    logged = [json.loads(line) for line in texts["log"].splitlines() if line.startswith("{")]
    assert any(r["logger"] == "medssl.warnings" and r["category"] == "UserWarning" for r in logged)
    assert all(line.startswith("{") for line in texts["log"].splitlines())  # nothing but JSON


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
