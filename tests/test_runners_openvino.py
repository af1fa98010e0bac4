"""OpenVINO's runtime behind the runner interface: the default on a CPU, equal to onnxruntime."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from medssl import runners
from medssl.errors import RunnerError
from medssl.runners import OnnxRunner, OpenVinoRunner, choose_runtime, open_runner
from medssl.runners.base import BatchedRunner


@pytest.fixture(scope="module")
def both(exported_detector):
    with OpenVinoRunner(exported_detector.onnx_path, exported_detector.card, threads=1) as ov, \
            OnnxRunner(exported_detector.onnx_path, exported_detector.card, threads=1) as ort:
        yield ov, ort


def test_openvino_outputs_equal_onnxruntime_within_fp32_tolerance(both, detector_patches):
    ov, ort = both
    for got, want in zip(ov(detector_patches), ort(detector_patches)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert ov.providers == ("OpenVINO CPU fp32",) and isinstance(ov, BatchedRunner)


def test_openvino_runs_batches_of_any_size_and_an_empty_one(both, detector_patches):
    ov, ort = both
    one = ov(detector_patches[:1])
    assert one[0].shape[0] == 1
    np.testing.assert_allclose(ov(detector_patches[1:2])[1], ort(detector_patches[1:2])[1], atol=1e-4)
    assert ov(detector_patches[:0])[0].shape[0] == 0


def test_an_openvino_runner_checks_the_card_like_onnxruntime(exported_detector, mismatched_card):
    with pytest.raises(RunnerError) as caught:
        OpenVinoRunner(exported_detector.onnx_path, mismatched_card)
    message = str(caught.value)
    assert "graph inputs ['patches'], card input 'image'" in message
    assert "'scores' is FP32 in the graph, FP16 in the card" in message


def test_auto_picks_openvino_on_a_cpu_and_logs_it(exported_detector, caplog):
    with caplog.at_level(logging.INFO, logger="medssl.runners"):
        with open_runner(exported_detector.repository, "nodules", threads=1) as opened:
            assert isinstance(opened, OpenVinoRunner)
    assert "runs on OpenVINO CPU fp32 (runtime auto: openvino)" in caplog.text


def test_auto_keeps_onnxruntime_for_gpus_explicit_providers_or_without_openvino(monkeypatch):
    assert choose_runtime("auto", ["CPUExecutionProvider"]) == "onnxruntime"
    monkeypatch.setattr(runners, "gpu_providers", lambda: ["CUDAExecutionProvider"])
    assert choose_runtime("auto") == "onnxruntime"
    monkeypatch.setattr(runners, "gpu_providers", lambda: [])
    assert choose_runtime("auto") == "openvino"
    monkeypatch.setattr(runners, "openvino_available", lambda: False)
    assert choose_runtime("auto") == "onnxruntime"
    assert choose_runtime("openvino") == "openvino"


def test_a_bad_runtime_is_refused(exported_detector):
    with pytest.raises(ValueError, match="runtime must be one of"):
        open_runner(exported_detector.repository, "nodules", runtime="tensorflow")
    with pytest.raises(ValueError, match="drop one of them"):
        open_runner(exported_detector.repository, "nodules", runtime="openvino", providers=["CPUExecutionProvider"])


def test_a_closed_openvino_runner_says_so(exported_detector, detector_patches):
    runner = OpenVinoRunner(exported_detector.onnx_path, exported_detector.card, threads=1)
    runner.close()
    with pytest.raises(RunnerError, match="closed"):
        runner(detector_patches[:1])
