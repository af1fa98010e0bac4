"""The gateway against a hostile corpus: a real ``medssl-serve`` process gets
more than 1,000 damaged CT datasets by C-STORE, each holding planted PHI, and a burst of
garbage PDUs; then a valid study.

Must hold: the process lives (``/healthz``), every dataset is answered with a DICOM status, no
planted PHI is in any output of the process (log, quarantine notes, job store, metrics), its
memory is back near its baseline, and the valid study is processed and delivered to a real
PACS (Orthanc).
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import pydicom
import pytest

from medssl.io import SeriesInfo, write_dicom_series
from medssl.testing.gateway import GatewayProcess
from tests.conftest import ramp_volume
from tests.fuzz_corpus import (
    KINDS,
    PHI_BIRTH_DATE,
    PHI_ID,
    PHI_NAME,
    garbage_pdus,
    gateway_texts,
    hostile_corpus,
    phi_found,
    send_cases,
    send_garbage,
)
from tests.serving.helpers import (
    associated,
    fuzz_gateway,
    status_of,
    wait_results,
    wait_settled,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: How far the gateway's RSS may stay above its baseline after the corpus (MiB): the baseline
#: is taken after a first valid study, so models, decoders and arenas are loaded already; what
#: is left is allocator slack and SQLite's page cache.
RSS_MARGIN_MIB = 64


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _valid_study(folder: Path, seed: str) -> list[Path]:
    """A small CT study (40 x 32 x 32, 1 mm voxels) of the planted patient."""
    volume = ramp_volume(shape=(40, 32, 32), spacing=(1.0, 1.0, 1.0))
    return write_dicom_series(
        volume,
        folder,
        SeriesInfo(
            uid_seed=seed,
            patient_name=PHI_NAME,
            patient_id=PHI_ID,
            patient_birth_date=PHI_BIRTH_DATE,
        ),
    )


def _store(gateway: GatewayProcess, files: list[Path]) -> list[int]:
    with associated(gateway.port, calling="STORESCU") as assoc:
        assert assoc.is_established
        return [status_of(assoc.send_c_store(pydicom.dcmread(f))) for f in files]


def _alive(gateway: GatewayProcess) -> None:
    assert gateway.process is not None and gateway.process.poll() is None, gateway.log_tail()
    assert gateway.http_get("/healthz")[0] == 200, gateway.log_tail()


def test_the_gateway_survives_a_hostile_corpus_and_then_delivers_a_valid_study(tmp_path, orthanc):
    t0 = time.monotonic()
    corpus = hostile_corpus()
    made_s = time.monotonic() - t0
    hostile = [c for c in corpus if c.kind != "companion"]
    assert len(hostile) >= 1000 and {c.kind for c in hostile} == set(KINDS)
    destination = {
        "name": "orthanc",
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "timeout_s": 5,
    }
    # series of 2+ slices: the valid studies and the hostile cases that have a companion slice
    # are read, decoded and run through the detector; the others are indexed and skipped.
    # A family's study goes on arriving for seconds: a longer idle time spares re-processing.
    # The deflate bombs inflate to 48 MiB: a 32 MiB bound refuses them.
    gateway = fuzz_gateway(
        tmp_path / "gw",
        destinations=[destination],
        min_slices=2,
        spool={"study_idle_s": 3.0},
        scp={"max_inflated_bytes": 32 * 2**20},
        processing={"workers": 1, "max_attempts": 2, "retry_backoff_s": 0.2},
    )
    gateway.start()
    try:
        # a first valid study loads models, decoders and arenas: then the baseline
        warm = _valid_study(tmp_path / "warm", "fuzz-warm")
        assert set(_store(gateway, warm)) == {0}
        wait_results(orthanc, gateway, str(pydicom.dcmread(warm[0]).StudyInstanceUID))
        wait_settled(gateway)
        baseline = _rss_mib(gateway.process.pid)

        t1 = time.monotonic()
        statuses = send_cases(gateway.port, corpus, tmp_path / "sent")
        sent_s = time.monotonic() - t1
        answers = send_garbage(gateway.port, garbage_pdus())
        _alive(gateway)

        valid = _valid_study(tmp_path / "valid", "fuzz-valid")
        assert set(_store(gateway, valid)) == {0}
        wait_results(orthanc, gateway, str(pydicom.dcmread(valid[0]).StudyInstanceUID))
        jobs = wait_settled(gateway, timeout_s=150)
        _alive(gateway)
        peak = _rss_mib(gateway.process.pid)
        metrics = gateway.http_get("/metrics")[1]
    finally:
        gateway.stop()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for case in corpus:
        by_kind[case.kind][
            f"0x{statuses[case.name] & 0xFFFF:04X}"
            if statuses[case.name] >= 0
            else str(statuses[case.name])
        ] += 1
    summary = {
        "cases": len(hostile),
        "companions": len(corpus) - len(hostile),
        "made_s": round(made_s, 2),
        "sent_s": round(sent_s, 1),
        "total_s": round(time.monotonic() - t0, 1),
        "rss_baseline_mib": round(baseline, 1),
        "rss_after_mib": round(peak, 1),
        "statuses": {k: dict(v) for k, v in by_kind.items()},
        "garbage_answered": sum(1 for a in answers if a),
        "jobs": dict(collections.Counter(j["state"] for j in jobs)),
    }
    print(json.dumps(summary, indent=1))
    no_status = [name for name, status in statuses.items() if status < 0]
    assert no_status == [], f"no DICOM status for {len(no_status)} cases: {no_status[:20]}"
    bombs = {name: status for name, status in statuses.items() if name.endswith("-bomb")}
    assert bombs and set(bombs.values()) == {0xC210}, bombs
    texts = gateway_texts(gateway.log, gateway.spool, metrics)
    leaks = phi_found(texts)
    assert leaks == {}, (
        "planted PHI in "
        + json.dumps({where: lines[:3] for where, lines in leaks.items()}, indent=1)[:6000]
    )
    strays = [line[:200] for line in texts["log"].splitlines() if not line.startswith("{")]
    assert strays == [], (
        f"{len(strays)} lines on stdout/stderr are not JSON log records: {strays[:5]}"
    )
    # a damaged series is a deterministic failure: never retried into dead-letter
    assert "dead-letter" not in summary["jobs"], [j for j in jobs if j["state"] == "dead-letter"]
    assert peak <= baseline + RSS_MARGIN_MIB, summary
    valid_uid = str(pydicom.dcmread(valid[0]).StudyInstanceUID)
    assert [j["state"] for j in jobs if j["study_uid"] == valid_uid] == ["done"]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q", "-s"]))
