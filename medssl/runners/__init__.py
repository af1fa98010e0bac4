"""Model runners: an exported model behind ``runner(patches) -> outputs`` (torch-free).

* :class:`OnnxRunner`: ``model.onnx`` in embedded onnxruntime (GPU providers, or any CPU).
* :class:`OpenVinoRunner`: ``model.onnx`` in OpenVINO's runtime, the fastest CPU path on x86-64.
* :class:`TritonRunner`: the model on a Triton server, over HTTP or gRPC.
* :func:`open_runner`: one of them, from a model repository and an optional server URL;
  ``runtime="auto"`` picks onnxruntime when it has a GPU provider, else OpenVINO when
  installed, else onnxruntime's CPU provider, and logs what it chose.

Every runner checks the model against its card (:mod:`medssl.models`) when it opens and
returns the card's outputs in order, so a detector's runner is a
:class:`medssl.pipeline.detect.DetectionRunner`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medssl.models.repository import ModelVersion, find_model_version
from medssl.runners.base import BatchedRunner, ModelRunner
from medssl.runners.metrics import read_metric
from medssl.runners.onnx import OnnxRunner, gpu_providers, select_providers
from medssl.runners.openvino import OpenVinoRunner, openvino_available
from medssl.runners.triton import TritonRunner

log = logging.getLogger(__name__)

#: Embedded runtimes :func:`open_runner` may be asked for.
RUNTIMES = ("auto", "onnxruntime", "openvino")

__all__ = [
    "RUNTIMES",
    "BatchedRunner",
    "ModelRunner",
    "ModelVersion",
    "OnnxRunner",
    "OpenVinoRunner",
    "TritonRunner",
    "choose_runtime",
    "find_model_version",
    "open_runner",
    "read_metric",
    "select_providers",
]


def choose_runtime(runtime: str = "auto", providers: Any = None) -> str:
    """The embedded runtime to use: ``onnxruntime`` or ``openvino``.

    ``auto``: onnxruntime when explicit ``providers`` are given or it offers a GPU provider
    (TensorRT, CUDA); otherwise OpenVINO's runtime when installed (the fastest CPU path:
    ``benchmarks/score_throughput.py``); otherwise onnxruntime's CPU provider.

    Raises:
        ValueError: ``runtime`` is not one of :data:`RUNTIMES`, or ``openvino`` is asked for
            together with onnxruntime ``providers``.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    if runtime == "openvino" and providers:
        raise ValueError(
            "onnxruntime providers were given with runtime 'openvino'; drop one of them"
        )
    if runtime != "auto":
        return runtime
    if providers or gpu_providers() or not openvino_available():
        return "onnxruntime"
    return "openvino"


def open_runner(
    repository: str | Path,
    name: str,
    *,
    triton_url: str | None = None,
    protocol: str = "http",
    version: int | None = None,
    runtime: str = "auto",
    **kw: Any,
) -> OnnxRunner | OpenVinoRunner | TritonRunner:
    """A runner for model ``name`` of a repository: embedded (onnxruntime or OpenVINO), or a
    Triton server. The choice is logged (INFO) with the runtime and provider that run it.

    Args:
        repository: the model repository folder; the card (and, without a server, the ONNX
            file) come from ``<repository>/<name>/<version>``.
        name: the model's name.
        triton_url: ``host:port`` of a Triton server serving the same repository; ``None``:
            run ``model.onnx`` in-process.
        protocol: ``"http"`` or ``"grpc"`` (with ``triton_url``).
        version: a version number; ``None``: the newest version folder (and, on Triton,
            the server's version policy).
        runtime: the embedded runtime (:func:`choose_runtime`); ignored with ``triton_url``.
        **kw: passed to the runner: ``threads`` (both embedded runtimes), ``providers``
            (onnxruntime), or :class:`TritonRunner`'s options.

    Raises:
        ModelRepositoryError: no such model or version (what exists is listed).
        RunnerError: the model cannot be run or disagrees with its card.
        ValueError: an unknown ``runtime``.
    """
    if triton_url is None:
        chosen = choose_runtime(runtime, kw.get("providers"))
        if chosen == "openvino":
            kw.pop("providers", None)
            runner: OnnxRunner | OpenVinoRunner = OpenVinoRunner.from_repository(
                repository, name, version, **kw
            )
        else:
            runner = OnnxRunner.from_repository(repository, name, version, **kw)
        log.info(
            "model %s v%d runs on %s (runtime %s)",
            runner.card.name,
            runner.card.version,
            ", ".join(runner.providers),
            runtime if runtime != "auto" else f"auto: {chosen}",
        )
        return runner
    found = find_model_version(repository, name, version)
    model_version = "" if version is None else str(version)
    return TritonRunner(
        triton_url, found.card, protocol=protocol, model_version=model_version, **kw
    )
