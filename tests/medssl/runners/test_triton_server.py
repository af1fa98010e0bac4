"""A real Triton server (nvidia-pytriton's ``tritonserver``) serving the exported detector.

The server runs the exported ``model.onnx`` through a Python-backend ``model.py``
(medssl/testing/triton_python_model.py) in the Triton env (``make triton-env``); the runners must
return what the embedded OnnxRunner returns, over HTTP and gRPC. Without the Triton env
these tests skip locally and fail under CI.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from medssl.errors import RunnerError
from medssl.models.triton_config import read_config
from medssl.runners import (
    OnnxRunner,
    TritonRunner,
    open_runner,
    read_metric,
)
from medssl.testing import LocalTritonServer
from medssl.testing.triton import python_backend_repository

pytestmark = [pytest.mark.integration, pytest.mark.triton]

PROTOCOLS = ["http", "grpc"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory, exported_detector) -> Path:
    """The exported model with a Python-backend config and model.py, as Triton loads it."""
    repo = tmp_path_factory.mktemp("triton_repository")
    python_backend_repository(exported_detector.model_dir, repo)
    return repo


@pytest.fixture(scope="module")
def server(triton_env, repository):
    with LocalTritonServer(repository, env=triton_env) as running:
        yield running


@pytest.fixture(scope="module")
def embedded(exported_detector):
    with OnnxRunner(exported_detector.onnx_path, exported_detector.card) as runner:
        yield runner


@pytest.fixture(scope="module")
def patches(detector_patches):
    return detector_patches


def url_of(server: LocalTritonServer, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def requests_served(server: LocalTritonServer, name: str) -> float:
    return read_metric(server.metrics_url, "nv_inference_request_success", {"model": name})


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_triton_returns_what_the_embedded_runner_returns(
    server, embedded, patches, exported_detector, protocol
):
    card = exported_detector.card
    with TritonRunner(url_of(server, protocol), card, protocol=protocol) as runner:
        served = runner(patches)
        served_ct = runner(patches[-1:])
    for got, want in zip(served, embedded(patches)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(served_ct, embedded(patches[-1:])):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_the_metrics_count_every_request(server, patches, exported_detector, repository):
    name = exported_detector.card.name
    before = requests_served(server, name)
    with open_runner(repository, name, triton_url=server.grpc_url, protocol="grpc") as runner:
        runner(np.concatenate([patches, patches[:2]]))  # 9 patches, max batch 4: 3 requests
        runner(patches[:1])
    deadline = time.monotonic() + 5
    while requests_served(server, name) - before < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert requests_served(server, name) - before == 4


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_card_that_disagrees_with_the_served_model_lists_every_mismatch(
    server, exported_detector, mismatched_card, protocol
):
    wrong = mismatched_card
    boxes = exported_detector.card.outputs[0]
    with pytest.raises(RunnerError) as caught:
        TritonRunner(url_of(server, protocol), wrong, protocol=protocol)
    message = str(caught.value)
    assert "served inputs ['patches'], card inputs ['image']" in message
    assert f"'boxes' has shape [-1, {boxes.shape[0]}, 4] on the server" in message
    assert "'scores' is FP32 on the server, FP16 in the card" in message


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_model_the_server_lacks_is_named_with_what_it_has(server, exported_detector, protocol):
    other = dataclasses.replace(exported_detector.card, name="lungs")
    with pytest.raises(RunnerError, match=r"model 'lungs'.*no such model \(it has \['nodules'\]\)"):
        TritonRunner(url_of(server, protocol), other, protocol=protocol, ready_timeout_s=0.5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_server_that_goes_away_fails_after_the_retries(
    triton_env, repository, patches, exported_detector, protocol
):
    with LocalTritonServer(repository, env=triton_env) as doomed:
        runner = TritonRunner(
            url_of(doomed, protocol),
            exported_detector.card,
            protocol=protocol,
            retries=2,
            backoff_s=0.1,
            timeout_s=5,
        )
        runner(patches[:1])
    tic = time.monotonic()
    with pytest.raises(RunnerError, match="after 3 attempts"):
        runner(patches[:1])
    assert time.monotonic() - tic < 5
    runner.close()


def test_the_exporters_production_config_parses(exported_detector):
    config = read_config(exported_detector.model_dir)
    card = exported_detector.card
    assert config.name == card.name and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == card.max_batch_size
    assert [i.name for i in config.input] == [card.input.name]
    assert list(config.input[0].dims) == list(card.input.shape)
    assert [o.name for o in config.output] == list(card.output_names)
