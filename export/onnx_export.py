"""PyTorch module → ONNX file with a dynamic batch axis, checked by ``onnx.checker``.

Uses the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``), the
default since PyTorch 2.9; the TorchScript exporter leaves output shapes symbolic, this one
writes them out (``boxes (batch, N, 4)``), which Triton's config and the card rely on.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch

from medssl.errors import ExportError

__all__ = ["MIN_OPSET", "OPSET", "convert_fp16", "export_onnx"]

#: Opset written by default; a model repository's ``model.onnx`` is opset >= 17 (the card's
#: contract, :data:`MIN_OPSET`).
OPSET = 18
MIN_OPSET = 17


def export_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: str | Path,
    *,
    input_name: str,
    output_names: Sequence[str],
    max_batch_size: int,
    opset: int = OPSET,
) -> Path:
    """Export ``module`` (in eval mode, on CPU) with a dynamic batch axis and check the file.

    Args:
        module: maps one ``(B, ...)`` float32 tensor to one tensor or a tuple of tensors.
        example: an input, ``(B, ...)``; its non-batch shape is fixed in the graph.
        path: where to write ``model.onnx`` (weights embedded, no external data).
        input_name: the graph input's name.
        output_names: names of the outputs, in the module's return order.
        max_batch_size: upper bound of the batch axis (``1..max_batch_size``).
        opset: ONNX opset, >= 17.

    Raises:
        ExportError: the exporter or ``onnx.checker`` failed (their message kept).
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; medssl exports opset >= {MIN_OPSET}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch_size, 2))
    module = module.eval()
    chatter = io.StringIO()  # the exporter prints progress lines; keep them out of the CLI
    # It also logs, per export, that torchvision's ops are skipped (we use none of them).
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(chatter), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            torch.onnx.export(
                module,
                (example,),
                path,
                input_names=[input_name],
                output_names=list(output_names),
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
            )
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # torch.export / onnx raise many types; keep the message
        raise ExportError(f"ONNX export failed ({type(exc).__name__}): {exc}") from exc
    return path


def convert_fp16(path: str | Path) -> Path:
    """Rewrite an fp32 ``model.onnx`` in place with fp16 weights and arithmetic.

    Inputs and outputs stay float32 (``keep_io_types``), so runners and Triton configs do
    not change with the precision. Uses onnxconverter-common's converter, then re-checks.
    """
    from onnxconverter_common import float16

    path = Path(path)
    with warnings.catch_warnings():  # one warning per weight below fp16's range: expected
        warnings.filterwarnings("ignore", message=".*will be truncated to.*", category=UserWarning)
        model = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path
