"""``medssl-serve`` as a user starts it: the shipped example config with the shipped models on
the embedded runner (no Triton, no PACS), environment overrides, and a config error that
names the bad key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from medssl.testing.orthanc import free_port
from tests.conftest import require_tool
from tests.paths import ROOT

pytestmark = [pytest.mark.integration]

EXAMPLE = ROOT / "examples" / "gateway.yaml"
SERVE = f"{sys.prefix}/bin/medssl-serve"


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_the_example_config_starts_with_the_shipped_models_and_stops_on_sigterm(tmp_path):
    echoscu = require_tool("echoscu", "dcmtk")
    port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MEDSSL_GATEWAY__SCP__PORT": str(port),
        "MEDSSL_GATEWAY__HTTP__PORT": str(http_port),
        "MEDSSL_GATEWAY__SPOOL__PATH": str(tmp_path / "spool"),
    }
    process = subprocess.Popen(
        [SERVE, "--config", str(EXAMPLE)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while _get(f"http://127.0.0.1:{http_port}/readyz") != 200:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.2)
        echo = subprocess.run(
            [echoscu, "-aet", "STORESCU", "-aec", "MEDSSL", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
        )
        assert echo.returncode == 0, echo.stderr
        assert (tmp_path / "spool" / "jobs.sqlite").is_file()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    logs = [
        yaml.safe_load(line) for line in process.stderr.read().splitlines() if line.startswith("{")
    ]
    assert {"gateway started", "gateway stopped"} <= {entry["message"] for entry in logs}


def test_check_loads_the_models_of_the_example():
    result = subprocess.run(
        [SERVE, "--config", str(EXAMPLE), "--check"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "focalmix-nodules" in result.stdout


def test_a_misspelt_key_is_named_at_start(tmp_path):
    config = yaml.safe_load(EXAMPLE.read_text())
    config["scp"]["max_asociations"] = 4
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([SERVE, "--config", str(path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "scp.max_asociations" in result.stderr and "scp.max_associations" in result.stderr


def test_environment_and_set_override_the_file():
    env = {
        **os.environ,
        "MEDSSL_GATEWAY__SCP__PORT": "11999",
        "MEDSSL_GATEWAY__MODELS__TRITON_URL": "triton:8001",
    }
    result = subprocess.run(
        [SERVE, "--config", str(EXAMPLE), "--set", "scp.max_associations=3", "--print-config"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["scp"]["port"] == 11999 and printed["scp"]["max_associations"] == 3
    assert printed["models"]["triton_url"] == "triton:8001"
    bad = subprocess.run(
        [SERVE, "--config", str(EXAMPLE), "--print-config"],
        capture_output=True,
        text=True,
        env={**os.environ, "MEDSSL_GATEWAY__SCP__PROT": "1"},
    )
    assert bad.returncode == 1 and "scp.prot" in bad.stderr


def test_the_geometry_limits_are_gateway_settings_validated_at_start(tmp_path):
    """``processing.geometry`` bounds what one series may take: set from the
    file or ``--set``, refused at start when inconsistent, and passed to every job."""
    from medssl.io.limits import GeometryLimits
    from medssl.serving.config import load_gateway_config

    cfg = load_gateway_config(EXAMPLE, {"processing.geometry.max_resampled_voxels": 2**24})
    assert cfg.processing.geometry == GeometryLimits(max_resampled_voxels=2**24)
    assert load_gateway_config(EXAMPLE).processing.geometry == GeometryLimits()
    bad = subprocess.run(
        [
            SERVE,
            "--config",
            str(EXAMPLE),
            "--print-config",
            "--set",
            "processing.geometry.min_spacing_mm=0",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "processing.geometry" in bad.stderr
