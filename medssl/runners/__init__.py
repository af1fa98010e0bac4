"""Model runners: an exported model behind ``runner(patches) -> outputs`` (torch-free).

* :class:`OnnxRunner` (the default): ``model.onnx`` in embedded onnxruntime.
* :class:`TritonRunner`: the model on a Triton server, over HTTP or gRPC.
* :func:`open_runner`: either one, from a model repository and an optional server URL.
* :class:`LocalTritonServer`: a real ``tritonserver`` on this machine, for tests and benchmarks.

Every runner checks the model against its card (:mod:`medssl.models`) when it opens and
returns the card's outputs in order, so a detector's runner is a
:class:`medssl.pipeline.detect.DetectionRunner`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medssl.models.repository import ModelVersion, find_model_version
from medssl.runners.base import BatchedRunner, ModelRunner
from medssl.runners.local_server import LocalTritonServer, find_triton_env
from medssl.runners.metrics import read_metric
from medssl.runners.onnx import OnnxRunner, select_providers
from medssl.runners.triton import TritonRunner

__all__ = [
    "BatchedRunner",
    "LocalTritonServer",
    "ModelRunner",
    "ModelVersion",
    "OnnxRunner",
    "TritonRunner",
    "find_model_version",
    "find_triton_env",
    "open_runner",
    "read_metric",
    "select_providers",
]


def open_runner(
    repository: str | Path,
    name: str,
    *,
    triton_url: str | None = None,
    protocol: str = "http",
    version: int | None = None,
    **kw: Any,
) -> OnnxRunner | TritonRunner:
    """A runner for model ``name`` of a repository: embedded onnxruntime, or a Triton server.

    Args:
        repository: the model repository folder; the card (and, without a server, the ONNX
            file) come from ``<repository>/<name>/<version>``.
        name: the model's name.
        triton_url: ``host:port`` of a Triton server serving the same repository; ``None``:
            run ``model.onnx`` in-process (:class:`OnnxRunner`).
        protocol: ``"http"`` or ``"grpc"`` (with ``triton_url``).
        version: a version number; ``None``: the newest version folder (and, on Triton,
            the server's version policy).
        **kw: passed to :class:`OnnxRunner` or :class:`TritonRunner`.

    Raises:
        ModelRepositoryError: no such model or version (what exists is listed).
        RunnerError: the model cannot be run or disagrees with its card.
    """
    if triton_url is None:
        return OnnxRunner.from_repository(repository, name, version, **kw)
    found = find_model_version(repository, name, version)
    model_version = "" if version is None else str(version)
    return TritonRunner(triton_url, found.card, protocol=protocol, model_version=model_version,
                        **kw)
