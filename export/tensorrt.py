"""ONNX → TensorRT engine (``model.plan``) on a CUDA GPU, and a runner for its parity check.

TensorRT 10 API: explicit-batch networks, one optimisation profile covering batch
``1..max_batch_size`` (optimum at half of it), FP16 kernels allowed on request.
Nothing here runs without a GPU: :func:`unavailable_reason` says why before any work starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medssl.atomic import atomic_write
from medssl.errors import ExportError

__all__ = ["TensorRTRunner", "build_engine", "unavailable_reason"]


def unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot be built here, or None when it can."""
    if not torch.cuda.is_available():
        return (
            "no CUDA GPU is visible on this machine; TensorRT engines are built on the GPU "
            "they will run on. Export without --tensorrt here (the ONNX model serves on CPU "
            "and GPU), and build the plan on the serving machine"
        )
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed: pip install 'medssl[gpu]'"
    return None


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    input_name: str,
    input_shape: Sequence[int],
    max_batch_size: int,
    fp16: bool,
    workspace_bytes: int = 1 << 30,
) -> Path:
    """Build and write a serialized engine for batches ``1..max_batch_size``.

    Args:
        onnx_path: the fp32 ONNX graph.
        plan_path: where to write ``model.plan``.
        input_name: the graph input.
        input_shape: input dims after the batch axis.
        max_batch_size: the profile's largest batch.
        fp16: allow FP16 kernels (TensorRT picks per layer).
        workspace_bytes: builder workspace limit, bytes.

    Raises:
        ExportError: the parser or the builder failed (their messages kept).
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    dims = tuple(input_shape)
    profile.set_shape(
        input_name, (1, *dims), (max(1, max_batch_size // 2), *dims), (max_batch_size, *dims)
    )
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(
            f"TensorRT failed to build an engine from {onnx_path} (see its log above)"
        )
    data = bytes(engine)
    plan_path = Path(plan_path)
    atomic_write(plan_path, lambda fh: fh.write(data))
    return plan_path


class TensorRTRunner:
    """Run a ``model.plan`` on the current CUDA device: ``patches (B, ...)`` → outputs (numpy).

    Args:
        plan_path: the serialized engine.
        input_name: the engine's input tensor.
        output_names: outputs to return, in this order.
    """

    def __init__(self, plan_path: str | Path, input_name: str, output_names: Sequence[str]) -> None:
        import tensorrt as trt

        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT cannot load {plan_path}")
        self.context = self.engine.create_execution_context()
        self.input_name = input_name
        self.output_names = list(output_names)

    def __call__(self, patches: np.ndarray) -> list[np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)).cuda()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        outputs = []
        for name in self.output_names:
            out = torch.empty(
                tuple(self.context.get_tensor_shape(name)), dtype=torch.float32, device="cuda"
            )
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed")
        stream.synchronize()
        return [o.cpu().numpy() for o in outputs]
