"""Triton Python-backend ``model.py`` serving ``model.onnx`` from its version folder.

nvidia-pytriton's ``tritonserver`` has only the Python backend, so
:func:`medssl.testing.triton.python_backend_repository` copies this file to
``<repository>/<name>/<version>/model.py`` next to the exported ``model.onnx``; medssl never
imports it.
It runs inside the Triton env (numpy<2, onnxruntime), never in the test process. Each
request runs on its own, exactly as the embedded OnnxRunner runs the same batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnxruntime
import triton_python_backend_utils as pb_utils

__all__ = ["TritonPythonModel"]


class TritonPythonModel:
    """Runs the version folder's ``model.onnx``; returns every output the config names."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            patches = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            values = self.session.run(self.output_names, {self.input_name: patches})
            tensors = [pb_utils.Tensor(n, v) for n, v in zip(self.output_names, values)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
