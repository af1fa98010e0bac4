"""Runners: the exported detector in embedded onnxruntime; a Triton client that fails cleanly."""

from __future__ import annotations

import shutil
import socket
import time

import numpy as np
import pytest

from medssl.errors import ModelRepositoryError, RunnerError
from medssl.pipeline.detect import detect
from medssl.runners import (
    BatchedRunner,
    ModelRunner,
    OnnxRunner,
    TritonRunner,
    open_runner,
    select_providers,
)
from medssl.volume import Volume


@pytest.fixture(scope="module")
def runner(exported_detector):
    with OnnxRunner(exported_detector.onnx_path, exported_detector.card) as opened:
        yield opened


@pytest.fixture(scope="module")
def patches(detector_patches):
    return detector_patches


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_outputs_equal_the_pytorch_model(runner, patches, detector_checkpoint):
    import torch

    from medssl.export.models import exportable
    from medssl.training.checkpoint import load_checkpoint

    module = exportable(load_checkpoint(detector_checkpoint), detector_checkpoint).module
    with torch.no_grad():
        expected = [t.numpy() for t in module(torch.from_numpy(patches))]
    boxes, scores = runner(patches)
    assert boxes.dtype == scores.dtype == np.float32
    np.testing.assert_allclose(boxes, expected[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scores, expected[1], rtol=1e-6, atol=1e-6)


def test_a_runner_is_a_detection_runner(runner, exported_detector):
    card = exported_detector.card
    assert isinstance(runner, ModelRunner)
    assert runner.card == card and runner.providers[-1] == "CPUExecutionProvider"
    hu = np.full((40, 40, 40), -800.0, np.float32)
    hu[16:24, 16:24, 16:24] = 40.0
    result = detect(Volume(hu, np.diag([1.0, 1.0, 1.0, 1.0])), runner, card.detection_params())
    assert result.n_windows == 8
    assert all(0 <= d.probability <= 1 for d in result.detections)


def test_a_batch_above_max_batch_size_runs_in_chunks(runner, patches):
    class Recording(BatchedRunner):
        """The real runner, recording the chunk sizes it is given."""

        card = runner.card
        _source = "recording"

        def __init__(self) -> None:
            self.sizes: list[int] = []

        def _infer(self, batch):
            self.sizes.append(len(batch))
            return runner._infer(batch)

        def close(self) -> None:
            pass

    recording = Recording()
    batch = np.concatenate([patches, patches[:2]])  # 9 patches, max_batch_size 4
    boxes, scores = recording(batch)
    assert runner.card.max_batch_size == 4 and recording.sizes == [4, 4, 1]
    chunks = [runner(batch[i : i + 4]) for i in (0, 4, 8)]
    np.testing.assert_array_equal(boxes, np.concatenate([b for b, _ in chunks]))
    np.testing.assert_array_equal(scores, np.concatenate([s for _, s in chunks]))


def test_float64_patches_are_cast_and_an_empty_batch_gives_empty_outputs(runner, patches):
    for got, want in zip(runner(patches[:2].astype(np.float64)), runner(patches[:2])):
        np.testing.assert_array_equal(got, want)
    boxes, scores = runner(patches[:0])
    assert boxes.shape == (0, *runner.card.outputs[0].shape) and scores.shape[0] == 0


@pytest.mark.parametrize("shape", [(2, 1, 16, 32, 32), (1, 32, 32, 32)])
def test_a_wrong_patch_shape_names_expected_and_received(runner, shape):
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32, 32\).*" + re_shape(shape)):
        runner(np.zeros(shape, np.float32))


def re_shape(shape: tuple[int, ...]) -> str:
    return r"\(" + r", ".join(str(d) for d in shape) + r"\)"


def test_non_numeric_patches_are_rejected(runner):
    with pytest.raises(ValueError, match="real numbers"):
        runner(np.zeros((1, 1, 32, 32, 32), dtype=np.complex64))


def test_a_card_that_disagrees_with_the_graph_lists_every_mismatch(
    exported_detector, mismatched_card
):
    wrong = mismatched_card
    boxes = exported_detector.card.outputs[0]
    with pytest.raises(RunnerError) as caught:
        OnnxRunner(exported_detector.onnx_path, wrong)
    message = str(caught.value)
    assert "graph inputs ['patches'], card input 'image'" in message
    assert f"'boxes' axis 1 is {boxes.shape[0]} in the graph, {boxes.shape[0] + 1}" in message
    assert "'scores' is FP32 in the graph, FP16 in the card" in message


def test_from_repository_opens_the_newest_version(exported_detector, tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(exported_detector.repository, repository)
    model_dir = repository / "nodules"
    shutil.copytree(model_dir / str(exported_detector.version), model_dir / "7")
    with OnnxRunner.from_repository(repository, "nodules") as newest:
        assert newest.model_path == model_dir / "7" / "model.onnx"
    with OnnxRunner.from_repository(repository, "nodules", exported_detector.version) as first:
        assert first.card == exported_detector.card


def test_from_repository_names_what_is_missing(exported_detector):
    repository = exported_detector.repository
    with pytest.raises(ModelRepositoryError, match=r"no version 99 .*versions present: \[1\]"):
        OnnxRunner.from_repository(repository, "nodules", 99)
    with pytest.raises(ModelRepositoryError, match=r"no model 'lungs'.*\['nodules'\]"):
        OnnxRunner.from_repository(repository, "lungs")


def test_open_runner_without_a_server_is_the_embedded_runner(exported_detector):
    with open_runner(
        exported_detector.repository, "nodules", threads=1, runtime="onnxruntime"
    ) as opened:
        assert isinstance(opened, OnnxRunner) and opened.card == exported_detector.card


def test_providers_fall_back_to_cpu_in_preference_order(exported_detector):
    assert select_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]
    assert select_providers(
        ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    ) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(["CPUExecutionProvider", "OpenVINOExecutionProvider"]) == [
        "OpenVINOExecutionProvider",
        "CPUExecutionProvider",
    ]
    with pytest.raises(RunnerError, match="none of"):
        select_providers(["AzureExecutionProvider"])
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(RunnerError, match="not available"):
            OnnxRunner(
                exported_detector.onnx_path,
                exported_detector.card,
                providers=["CUDAExecutionProvider"],
            )


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_unreachable_triton_url_fails_fast_and_says_what_to_check(exported_detector, protocol):
    url = f"127.0.0.1:{closed_port()}"
    tic = time.monotonic()
    with pytest.raises(RunnerError) as caught:
        open_runner(
            exported_detector.repository,
            "nodules",
            triton_url=url,
            protocol=protocol,
            ready_timeout_s=1.0,
            timeout_s=1.0,
        )
    assert time.monotonic() - tic < 5
    message = str(caught.value)
    assert f"Triton {protocol} endpoint {url} is not reachable after 1 s" in message
    assert "Check that tritonserver is running" in message


def test_triton_runner_rejects_a_url_with_a_scheme(exported_detector):
    with pytest.raises(ValueError, match="without a scheme"):
        TritonRunner("http://127.0.0.1:8000", exported_detector.card)
