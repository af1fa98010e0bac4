"""What each kind of medssl checkpoint exports to: the graph, its card fields and test inputs.

A checkpoint names its model type in ``state["kind"]``; :data:`EXPORTERS` maps a kind to a
function building an :class:`Exportable`. Detection is here; segmentation kinds register
next to their trainers' checkpoint format.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import CheckpointError, ConfigError, ExportError
from medssl.models.card import NODULE_LABEL, Decoding, Label, Task, TensorSpec
from medssl.pipeline.preprocess import Intensity
from medssl.synth.patches import chest_patch
from medssl.training.config import config_from_dict
from medssl.training.det_config import DetectionExperiment
from medssl.training.det_eval import detection_params
from medssl.training.detector import DetectorInference, FPNDetector

__all__ = ["EXPORTERS", "Exportable", "exportable"]


@dataclass
class Exportable:
    """A checkpoint made ready to export.

    Attributes:
        module: the graph to export: ``(B, *input.shape)`` float32 → the outputs, in order.
        task: detection or segmentation.
        input: the input tensor (shape after the batch axis).
        outputs: the output tensors, in the module's return order.
        input_spacing: voxel size ``(z, y, x)`` mm.
        normalisation: HU window the inputs were scaled with.
        overlap: recommended sliding-window overlap.
        labels: output classes and their codes.
        decoding: detection post-processing (None for segmentation).
        provenance: what the checkpoint says about its training.
    """

    module: torch.nn.Module
    task: Task
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    input_spacing: tuple[float, float, float]
    normalisation: Intensity
    overlap: float
    labels: tuple[Label, ...]
    decoding: Decoding | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def synthetic_patch(self, seed: int = 0) -> np.ndarray:
        """A preprocessed synthetic chest CT patch ``(1, *input.shape)`` for parity checks."""
        return chest_patch(self.input.shape[1:], self.input_spacing, self.normalisation, seed)


def _detector(state: Mapping[str, Any], path: Path) -> Exportable:
    """A FocalMix / supervised detector checkpoint (``kind: medssl.detector``)."""
    try:
        cfg = config_from_dict(DetectionExperiment, state["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(path, f"the checkpoint's config is missing or invalid ({exc})") from exc
    net = FPNDetector(cfg.model, cfg.anchors)
    try:
        net.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(path, f"weights do not fit the configured network ({exc})") from exc
    w = cfg.window
    module = DetectorInference(net, (w, w, w)).eval()
    n_anchors = int(module.centres.shape[0])
    params = detection_params(cfg)
    grid = f"{params.spacing_mm:g} mm voxels"
    provenance = {**dict(state.get("provenance") or {}), "method": cfg.method, "step": state.get("step"),
                  "validation_metrics": dict(state.get("metrics") or {})}
    return Exportable(
        module=module,
        task=Task.DETECTION,
        input=TensorSpec("patches", "FP32", (1, w, w, w),
                         f"CT patch (channel, z, y, x) on {grid}, HU window mapped to [-1, 1]"),
        outputs=(
            TensorSpec("boxes", "FP32", (n_anchors, 4),
                       "decoded anchor boxes (z, y, x, d): centre and cube edge in patch voxels"),
            TensorSpec("scores", "FP32", (n_anchors,), "nodule probability of each box, [0, 1]"),
        ),
        input_spacing=(params.spacing_mm,) * 3,
        normalisation=params.intensity,
        overlap=params.overlap,
        labels=(NODULE_LABEL,),
        decoding=Decoding(
            divisor=params.divisor, score_threshold=params.score_threshold,
            pre_nms_top_k=params.pre_nms_top_k, nms_iou=params.nms_iou,
            max_detections=params.max_detections, min_diameter_mm=params.min_diameter_mm,
            anchor_strides=tuple(cfg.anchors.strides), anchor_sizes=tuple(cfg.anchors.sizes),
        ),
        provenance=provenance,
    )


#: checkpoint ``kind`` → builder.
EXPORTERS: dict[str, Callable[[Mapping[str, Any], Path], Exportable]] = {"medssl.detector": _detector}


def exportable(state: Mapping[str, Any], path: str | Path) -> Exportable:
    """The :class:`Exportable` of a loaded checkpoint.

    Raises:
        ExportError: the checkpoint's ``kind`` is absent or not one medssl exports.
        CheckpointError: its config or weights are broken.
    """
    kind = state.get("kind")
    if kind is None:
        raise ExportError(f"{path}: not a medssl checkpoint (no 'kind' key); export checkpoints "
                          f"written by medssl-train (checkpoints/best.pt or last.pt)")
    if kind not in EXPORTERS:
        raise ExportError(f"{path}: unknown model type {kind!r}; medssl-export knows "
                          f"{sorted(EXPORTERS)}")
    return EXPORTERS[kind](state, Path(path))
