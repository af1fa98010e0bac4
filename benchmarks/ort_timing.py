"""Time one ONNX model in onnxruntime, in whatever environment runs this file.

Needs only numpy and an onnxruntime wheel, so ``benchmarks/export_speed.py`` can run it with
another environment's interpreter (``onnxruntime-openvino`` cannot share a venv with
``onnxruntime``: both install the ``onnxruntime`` package). Prints one JSON object:
``{"version", "providers", "max_abs_vs_cpu_provider", "rows": [{"batch", "calls_s"}]}``.

    python ort_timing.py model.onnx --provider OpenVINOExecutionProvider --batches 1 4
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort

#: Provider options matching medssl.runners.onnx.PROVIDER_OPTIONS (fp32 OpenVINO on the CPU).
OPTIONS = {"OpenVINOExecutionProvider": {"device_type": "CPU", "precision": "FP32"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--provider", default="CPUExecutionProvider")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    session = ort.InferenceSession(
        args.model, providers=[(args.provider, OPTIONS.get(args.provider, {}))]
    )
    node = session.get_inputs()[0]
    reference = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    rows = []
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, *node.shape[1:]), dtype=np.float32)
    max_abs = max(
        float(np.abs(a - b).max())
        for a, b in zip(
            session.run(None, {node.name: sample}), reference.run(None, {node.name: sample})
        )
    )
    for batch in args.batches:
        x = rng.standard_normal((batch, *node.shape[1:]), dtype=np.float32)
        for _ in range(args.warmup):
            session.run(None, {node.name: x})
        calls = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            session.run(None, {node.name: x})
            calls.append(time.perf_counter() - start)
        rows.append({"batch": batch, "calls_s": calls})
    print(
        json.dumps(
            {
                "version": ort.__version__,
                "providers": session.get_providers(),
                "max_abs_vs_cpu_provider": max_abs,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
