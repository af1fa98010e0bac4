"""Fixtures of the gateway tests: an Orthanc PACS, in-process Storage SCPs and a small series."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from medssl.io import SeriesInfo, write_dicom_series
from medssl.serving.config import AllowedCaller, ScpConfig
from medssl.serving.metrics import GatewayMetrics
from medssl.serving.scp import StorageSCP
from medssl.serving.spool import Spool
from medssl.testing.orthanc import OrthancServer
from tests.conftest import ramp_volume, require_tool
from tests.serving.helpers import PHI, Gateway


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    require_tool("Orthanc", "orthanc")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def gateway(tmp_path) -> Iterator:
    """Start a StorageSCP on a free loopback port: ``gateway(**ScpConfig overrides)``."""
    running: list[StorageSCP] = []

    def start(*, min_free_bytes: int = 0, on_stored=None, **overrides) -> Gateway:
        settings = {
            "port": 0,
            "allowed_callers": (AllowedCaller("SCU"), AllowedCaller("STORESCU")),
            "acse_timeout_s": 5,
            "dimse_timeout_s": 10,
            "network_timeout_s": 10,
        }
        settings.update(overrides)
        spool = Spool(tmp_path / f"spool{len(running)}", min_free_bytes=min_free_bytes)
        metrics, stored = GatewayMetrics(), []
        scp = StorageSCP(ScpConfig(**settings), spool, on_stored or stored.append, metrics)
        scp.start()
        running.append(scp)
        return Gateway(scp, spool, metrics, stored)

    yield start
    for scp in running:
        scp.stop(timeout_s=2)


@pytest.fixture
def series(tmp_path) -> list[Path]:
    """A 4-slice 16 x 18 CT series (Explicit VR Little Endian) of patient ``PHI``."""
    return write_dicom_series(
        ramp_volume(shape=(4, 16, 18)), tmp_path / "series", SeriesInfo(uid_seed="scp-test", **PHI)
    )
