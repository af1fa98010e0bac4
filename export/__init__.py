"""Export: medssl checkpoints to ONNX (and TensorRT) in a Triton model repository.

``export_checkpoint`` writes a versioned model with its card and ``config.pbtxt``, after
proving with onnxruntime that the exported graph computes what the checkpoint computes.
"""

from medssl.export.exporter import (
    ExportOptions,
    ExportResult,
    export_checkpoint,
    resolve_checkpoint,
)
from medssl.export.parity import TOLERANCES, ParityReport

__all__ = [
    "TOLERANCES",
    "ExportOptions",
    "ExportResult",
    "ParityReport",
    "export_checkpoint",
    "resolve_checkpoint",
]
