"""OpenVINO's runtime behind the runner interface: the default on a CPU, equal to onnxruntime.

OpenVINO runs in a child process (:func:`_openvino_facts`): the test process also runs torch,
and the two in one process crashed the suite (``tests/conftest.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from medssl import runners
from medssl.runners import choose_runtime, open_runner

_CHILD = r"""
import dataclasses, json, logging, sys
import numpy as np
from medssl.errors import RunnerError
from medssl.runners import OnnxRunner, OpenVinoRunner, open_runner
from medssl.runners.base import BatchedRunner

onnx_path, repository, patches_path = sys.argv[1:4]
from medssl.models.repository import find_model_version

card = find_model_version(repository, "nodules").card
patches = np.load(patches_path)
facts = {}
ov = OpenVinoRunner(onnx_path, card, threads=1)
ort = OnnxRunner(onnx_path, card, threads=1)
with ov, ort:
    got, want = ov(patches), ort(patches)
    facts["max_abs_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    pairs = list(zip(got, want))
    same = [a.shape == b.shape and a.dtype == b.dtype for a, b in pairs]
    facts["same_shapes_and_dtypes"] = all(same)
    facts["providers"] = list(ov.providers)
    facts["is_batched_runner"] = isinstance(ov, BatchedRunner)
    facts["one_batch"] = ov(patches[:1])[0].shape[0]
    facts["single_diff"] = float(np.abs(ov(patches[1:2])[1] - ort(patches[1:2])[1]).max())
    facts["empty_batch"] = ov(patches[:0])[0].shape[0]
boxes, scores = card.outputs
wrong = dataclasses.replace(card, input=dataclasses.replace(card.input, name="image"),
                            outputs=(boxes, dataclasses.replace(scores, datatype="FP16")))
try:
    OpenVinoRunner(onnx_path, wrong)
    facts["mismatch"] = ""
except RunnerError as exc:
    facts["mismatch"] = str(exc)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


lines = Lines()
logging.getLogger("medssl.runners").addHandler(lines)
logging.getLogger("medssl.runners").setLevel(logging.INFO)
with open_runner(repository, "nodules", threads=1) as opened:
    facts["auto_type"] = type(opened).__name__
facts["log"] = lines.lines
closed = OpenVinoRunner(onnx_path, card, threads=1)
closed.close()
try:
    closed(patches[:1])
    facts["closed"] = ""
except RunnerError as exc:
    facts["closed"] = str(exc)
print(json.dumps(facts))
"""


@pytest.fixture(scope="module")
def facts(exported_detector, detector_patches, tmp_path_factory) -> dict:
    """What OpenVINO did with the exported detector, measured in a child process."""
    patches = tmp_path_factory.mktemp("ov") / "patches.npy"
    np.save(patches, detector_patches)
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            str(exported_detector.onnx_path),
            str(exported_detector.repository),
            str(patches),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_openvino_outputs_equal_onnxruntime_within_fp32_tolerance(facts):
    assert facts["same_shapes_and_dtypes"] and facts["max_abs_diff"] < 1e-4
    assert facts["providers"] == ["OpenVINO CPU fp32"] and facts["is_batched_runner"]


def test_openvino_runs_batches_of_any_size_and_an_empty_one(facts):
    assert facts["one_batch"] == 1 and facts["single_diff"] < 1e-4 and facts["empty_batch"] == 0


def test_an_openvino_runner_checks_the_card_like_onnxruntime(facts):
    assert "graph inputs ['patches'], card input 'image'" in facts["mismatch"]
    assert "'scores' is FP32 in the graph, FP16 in the card" in facts["mismatch"]


def test_auto_picks_openvino_on_a_cpu_and_logs_it(facts):
    assert facts["auto_type"] == "OpenVinoRunner"
    assert any(
        "runs on OpenVINO CPU fp32 (runtime auto: openvino)" in line for line in facts["log"]
    )


def test_a_closed_openvino_runner_says_so(facts):
    assert "closed" in facts["closed"]


def test_auto_keeps_onnxruntime_for_gpus_explicit_providers_or_without_openvino(monkeypatch):
    assert choose_runtime("auto", ["CPUExecutionProvider"]) == "onnxruntime"
    monkeypatch.setattr(runners, "openvino_available", lambda: True)
    monkeypatch.setattr(runners, "gpu_providers", lambda: ["CUDAExecutionProvider"])
    assert choose_runtime("auto") == "onnxruntime"
    monkeypatch.setattr(runners, "gpu_providers", list)
    assert choose_runtime("auto") == "openvino"
    monkeypatch.setattr(runners, "openvino_available", lambda: False)
    assert choose_runtime("auto") == "onnxruntime"
    assert choose_runtime("openvino") == "openvino"


def test_a_bad_runtime_is_refused(exported_detector):
    with pytest.raises(ValueError, match="runtime must be one of"):
        open_runner(exported_detector.repository, "nodules", runtime="tensorflow")
    with pytest.raises(ValueError, match="drop one of them"):
        open_runner(
            exported_detector.repository,
            "nodules",
            runtime="openvino",
            providers=["CPUExecutionProvider"],
        )
