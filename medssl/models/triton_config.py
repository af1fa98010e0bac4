"""Triton ``config.pbtxt``: built from a model card as Triton's own ``ModelConfig`` protobuf.

Configs are made with the message types ``tritonclient`` ships (``model_config_pb2``) and
written with protobuf's text format, so a config medssl writes is one Triton can parse; every
written file is parsed back before it counts as written.

Reference: Triton's ``model_config.proto`` and the "Model Configuration" guide.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from medssl.atomic import atomic_write
from medssl.errors import ModelRepositoryError
from medssl.models.card import ModelCard, TensorSpec

__all__ = [
    "CONFIG_FILE",
    "Backend",
    "InstanceKind",
    "ServingOptions",
    "model_config",
    "read_config",
    "write_config",
]

CONFIG_FILE = "config.pbtxt"


class Backend(str, Enum):
    """How Triton runs the model, and the file in each version folder."""

    ONNXRUNTIME = "onnxruntime"  # platform onnxruntime_onnx, model.onnx
    TENSORRT = "tensorrt"  # platform tensorrt_plan, model.plan
    PYTHON = "python"  # backend python, model.py (e.g. onnxruntime inside the Python backend)

    @property
    def model_file(self) -> str:
        return {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "python": "model.py"}[
            self.value
        ]


class InstanceKind(str, Enum):
    """Where Triton places model instances."""

    GPU = "gpu"
    CPU = "cpu"


@dataclass(frozen=True)
class ServingOptions:
    """Batching, instances and accelerators of a Triton model.

    Attributes:
        instances: model instances (``instance_group.count``).
        kind: GPU (Triton's default for production) or CPU instances.
        preferred_batch_sizes: batch sizes the dynamic batcher aims for; empty = powers of
            two up to the card's ``max_batch_size`` (and the maximum itself).
        max_queue_delay_us: how long the batcher waits to fill a batch, microseconds.
        warmup: add a ``model_warmup`` request (random input, batch 1) run at load time.
        tensorrt_accelerator: ask the onnxruntime backend for its TensorRT execution
            accelerator (GPU instances only).
        tensorrt_fp16: TensorRT accelerator precision FP16 (else FP32).
        workspace_bytes: TensorRT builder workspace, bytes.
    """

    instances: int = 1
    kind: InstanceKind = InstanceKind.GPU
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 100
    warmup: bool = False
    tensorrt_accelerator: bool = False
    tensorrt_fp16: bool = True
    workspace_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", InstanceKind(self.kind))
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.workspace_bytes < 1:
            raise ValueError(f"workspace_bytes must be >= 1, got {self.workspace_bytes}")
        if self.tensorrt_accelerator and self.kind is InstanceKind.CPU:
            raise ValueError("the TensorRT accelerator needs GPU instances (kind='gpu')")

    def batch_sizes(self, max_batch_size: int) -> list[int]:
        """The preferred batch sizes for a model of ``max_batch_size``."""
        sizes = self.preferred_batch_sizes or tuple(
            {2**i for i in range(max_batch_size.bit_length()) if 2**i <= max_batch_size}
            | {max_batch_size}
        )
        bad = [s for s in sizes if not 1 <= s <= max_batch_size]
        if bad:
            raise ValueError(f"preferred batch sizes {bad} exceed max_batch_size {max_batch_size}")
        return sorted(set(sizes))


def _pb() -> Any:
    """Triton's ``model_config_pb2`` (from tritonclient), or a clear error."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # pragma: no cover - the serve extra is a declared dependency
        raise ImportError("Triton configs need tritonclient: pip install 'medssl[serve]'") from exc
    return model_config_pb2


def _tensor(message: Any, spec: TensorSpec, pb: Any) -> None:
    message.name = spec.name
    message.data_type = pb.DataType.Value(f"TYPE_{spec.datatype}")
    message.dims.extend(spec.shape)


def model_config(
    card: ModelCard,
    backend: Backend | str = Backend.ONNXRUNTIME,
    options: ServingOptions | None = None,
) -> Any:
    """Triton ``ModelConfig`` for the model a card describes.

    Args:
        card: name, tensors and ``max_batch_size`` come from here.
        backend: onnxruntime (``platform: onnxruntime_onnx``), TensorRT
            (``platform: tensorrt_plan``) or the Python backend (``backend: python``).
        options: batching, instances, warmup and accelerators.

    Returns:
        ``tritonclient.grpc.model_config_pb2.ModelConfig``.
    """
    pb = _pb()
    backend = Backend(backend)
    options = options or ServingOptions()
    config = pb.ModelConfig(name=card.name, max_batch_size=card.max_batch_size)
    if backend is Backend.ONNXRUNTIME:
        config.platform = "onnxruntime_onnx"
    elif backend is Backend.TENSORRT:
        config.platform = "tensorrt_plan"
    else:
        config.backend = "python"
    _tensor(config.input.add(), card.input, pb)
    for spec in card.outputs:
        _tensor(config.output.add(), spec, pb)
    config.dynamic_batching.preferred_batch_size.extend(options.batch_sizes(card.max_batch_size))
    config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    kind = (
        pb.ModelInstanceGroup.KIND_GPU
        if options.kind is InstanceKind.GPU
        else pb.ModelInstanceGroup.KIND_CPU
    )
    config.instance_group.add(count=options.instances, kind=kind)
    if options.warmup:
        warmup = config.model_warmup.add(name=f"{card.name}_random_batch1", batch_size=1)
        sample = warmup.inputs[card.input.name]
        sample.data_type = pb.DataType.Value(f"TYPE_{card.input.datatype}")
        sample.dims.extend(card.input.shape)
        sample.random_data = True
    if options.tensorrt_accelerator and backend is Backend.ONNXRUNTIME:
        accel = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt"
        )
        accel.parameters["precision_mode"] = "FP16" if options.tensorrt_fp16 else "FP32"
        accel.parameters["max_workspace_size_bytes"] = str(options.workspace_bytes)
    return config


def write_config(config: Any, model_dir: str | Path) -> Path:
    """Write ``model_dir/config.pbtxt`` atomically, then parse it back.

    Raises:
        ModelRepositoryError: the written text does not parse into ``ModelConfig`` (a bug).
    """
    from google.protobuf import text_format

    path = Path(model_dir) / CONFIG_FILE
    text = text_format.MessageToString(config).encode("utf-8")
    atomic_write(path, lambda fh: fh.write(text))
    if read_config(path) != config:
        raise ModelRepositoryError(path, "written config does not read back identically")
    return path


def read_config(path: str | Path) -> Any:
    """Parse a ``config.pbtxt`` (or the model folder holding it) into ``ModelConfig``.

    Raises:
        ModelRepositoryError: the file is missing or does not parse (the parser's line and
            column named).
    """
    from google.protobuf import text_format

    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise ModelRepositoryError(path, f"no {CONFIG_FILE}; every Triton model folder needs one")
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), _pb().ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ModelRepositoryError(path, f"not a valid Triton ModelConfig: {exc}") from exc
