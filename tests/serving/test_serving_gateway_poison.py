"""Poison instances and implausible geometry, end to end: a study whose good series comes with
poison instances (a one-valued ImageOrientationPatient, an empty Shared Functional Groups Sequence)
and a series of implausible geometry (PixelSpacing 1000 mm) is processed once, not retried into
dead-letter: the good series' SR reaches the PACS (a real Orthanc) and the bad series fail with
reasons.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from medssl.io import write_dicom_series
from medssl.io.dicom_enhanced import write_enhanced_ct
from medssl.synth.chest import ChestConfig, generate_chest_ct
from medssl.synth.datasets import chest_series_info
from medssl.testing.gateway import GatewayProcess, gateway_config
from medssl.testing.orthanc import OrthancServer
from tests.conftest import require_tool
from tests.dicom_edits import copy_series
from tests.paths import MODEL_REPOSITORY
from tests.serving.helpers import dataset, storescu

pytestmark = [pytest.mark.integration, pytest.mark.orthanc]

REPOSITORY = MODEL_REPOSITORY


@pytest.fixture
def poisoned_study(tmp_path) -> dict[str, list[Path]]:
    """A 64 x 64 x 40 chest CT series, and in the same study: one instance of a series with a
    one-valued ImageOrientationPatient, an Enhanced CT file with an empty Shared Functional
    Groups Sequence, and a copy of the good series with PixelSpacing 1000 mm."""
    case = generate_chest_ct(21, ChestConfig(matrix=64, n_slices=40))
    info = chest_series_info(21, case)
    good = write_dicom_series(case.volume, tmp_path / "good", info)
    enhanced = write_enhanced_ct(case.volume, tmp_path / "enhanced" / "ct.dcm", info)
    return {
        "good": good,
        "one-valued": copy_series(
            tmp_path / "good",
            tmp_path / "one-valued",
            "one-valued",
            count=1,
            ImageOrientationPatient="1",
        ),
        "empty-shared": copy_series(
            enhanced.parent,
            tmp_path / "empty-shared",
            "empty-shared",
            SharedFunctionalGroupsSequence=[],
        ),
        "huge": copy_series(
            tmp_path / "good", tmp_path / "huge", "huge", PixelSpacing=[1000.0, 1000.0]
        ),
    }


def test_poison_instances_fail_their_series_and_the_good_series_is_delivered(
    tmp_path, poisoned_study
):
    require_tool("Orthanc", "orthanc")
    files = [p for group in poisoned_study.values() for p in group]
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    good_series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        routes = [
            {
                "model": "focalmix-nodules",
                "min_probability": 0.5,
                "select": {
                    "modality": "CT",
                    "min_slices": 1,
                    "orientation": "",
                    "image_type": [],
                    "max_thickness_mm": 100,
                },
            }
        ]
        cfg = gateway_config(
            tmp_path / "gw",
            routes,
            REPOSITORY,
            [
                {
                    "name": "orthanc",
                    "ae_title": orthanc.aet,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                    "timeout_s": 5,
                }
            ],
        )
        # the limits are the gateway's settings (processing.geometry): a stated, odd limit
        # shows that the jobs use the configured ones, not the defaults
        cfg["processing"]["geometry"] = {"max_pixel_spacing_mm": 500.0}
        gateway = GatewayProcess(tmp_path / "gw", cfg)
        gateway.start()
        try:
            storescu(gateway, files)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                state = (gateway.jobs() or [{"state": None}])[-1]["state"]
                delivered = [d for d in gateway.deliveries() if d["state"] == "sent"]
                if state in ("failed", "dead-letter") or (state == "done" and delivered):
                    break
                time.sleep(0.25)
            [job] = gateway.jobs()
            assert (job["state"], job["attempts"]) == ("done", 1), (job, gateway.log_tail())
            [sr] = orthanc.instances_of(study_uid, "SR")
            evidence = dataset(orthanc, sr).CurrentRequestedProcedureEvidenceSequence[0]
            assert {s.SeriesInstanceUID for s in evidence.ReferencedSeriesSequence} == {good_series}
            log = gateway.log.read_text()
            assert job["error"].startswith("series failed: ")  # the job store keeps the reasons
            for name, reason in (
                ("one-valued", "ImageOrientationPatient has 1 value(s)"),
                ("empty-shared", "frame 1 lacks plane position"),
                ("huge", "PixelSpacing (row) is 1000 mm, the limit is [0.05, 500] mm"),
            ):
                uid = str(
                    pydicom.dcmread(
                        poisoned_study[name][0], stop_before_pixels=True
                    ).SeriesInstanceUID
                )
                assert f"{uid} (focalmix-nodules): " in job["error"] and reason in job["error"], (
                    name
                )
                assert any(
                    uid in line and "failed" in line and reason in line for line in log.splitlines()
                ), name
        finally:
            gateway.stop()
