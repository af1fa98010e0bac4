"""Serving, scoring and the core never import torch: a deployment image has none."""

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration]

TORCH_FREE = [
    "medssl",
    "medssl.io",
    "medssl.index",
    "medssl.datasets.luna16",
    "medssl.datasets.decathlon",
    "medssl.datasets.dicom_tree",
    "medssl.synth.datasets",
    "medssl.pipeline",
    "medssl.detection",
    "medssl.metrics",
    "medssl.atomic",
    "medssl.training.cache",
    "medssl.config",
    "medssl.cli.train",
    "medssl.serving",
    "medssl.serving.gateway",
    "medssl.serving.process",
    "medssl.serving.scp",
    "medssl.serving.sender",
    "medssl.cli.serve",
    "medssl.cli.main",
    "medssl.cli.export",
    "medssl.models",
    "medssl.models.repository",
    "medssl.models.triton_config",
    "medssl.synth.patches",
    "medssl.synth.archive",
    "medssl.scoring",
    "medssl.scoring.local",
    "medssl.scoring.series",
    "medssl.scoring.ray_engine",
    "medssl.cli.score",
    "medssl.runners",
    # what the runners import when one opens
    "onnxruntime",
    "tritonclient.http",
    "tritonclient.grpc",
    "prometheus_client.parser",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_does_not_import_torch(module):
    code = f"import sys, {module}; sys.exit(3 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr or f"{module} imported torch"


def test_the_check_detects_torch():
    code = "import sys, torch; sys.exit(3 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 3
