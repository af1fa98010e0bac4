"""What each kind of medssl checkpoint exports to: the graph, its card fields and test inputs.

A checkpoint names its model type in ``state["kind"]``; :data:`EXPORTERS` maps a kind to a
function building an :class:`Exportable`: ``medssl.detector`` (FocalMix and its baseline) and
``medssl.segmenter`` (A&D and the segmentation baselines).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.config import config_from_dict
from medssl.errors import CheckpointError, ConfigError, ExportError
from medssl.models.anatomy import organ_label
from medssl.models.card import NODULE_LABEL, Decoding, Label, Task, TensorSpec
from medssl.pipeline.preprocess import Intensity, PercentileIntensity
from medssl.synth.patches import chest_patch, organ_patch
from medssl.training.checkpoint import CheckpointKind
from medssl.training.detection.config import DetectionExperiment
from medssl.training.detection.eval import detection_params
from medssl.training.networks.detector import DetectorInference, FPNDetector
from medssl.training.networks.segmenter import inference_net
from medssl.training.segmentation.config import SegmentationExperiment
from medssl.training.segmentation.eval import segmentation_params

__all__ = ["EXPORTERS", "Exportable", "SegmenterInference", "exportable"]


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
        sample: ``seed -> (1, *input.shape)`` float32, a realistic preprocessed input for
            parity checks (a synthetic CT patch of the anatomy the model is for).
        sample_name: what ``sample`` is, for the parity report.
    """

    module: torch.nn.Module
    task: Task
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    input_spacing: tuple[float, float, float]
    normalisation: Intensity | PercentileIntensity
    overlap: float
    labels: tuple[Label, ...]
    sample: Callable[[int], np.ndarray]
    sample_name: str
    decoding: Decoding | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def synthetic_patch(self, seed: int = 0) -> np.ndarray:
        """:attr:`sample` for ``seed``: ``(1, *input.shape)`` float32."""
        return self.sample(seed)


def _detector(state: Mapping[str, Any], path: Path) -> Exportable:
    """A FocalMix / supervised detector checkpoint (``kind: medssl.detector``)."""
    try:
        cfg = config_from_dict(DetectionExperiment, state["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(
            path, f"the checkpoint's config is missing or invalid ({exc})"
        ) from exc
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
    provenance = {
        **dict(state.get("provenance") or {}),
        "method": cfg.method,
        "step": state.get("step"),
        "validation_metrics": dict(state.get("metrics") or {}),
    }
    return Exportable(
        module=module,
        task=Task.DETECTION,
        input=TensorSpec(
            "patches",
            "FP32",
            (1, w, w, w),
            f"CT patch (channel, z, y, x) on {grid}, HU window mapped to [-1, 1]",
        ),
        outputs=(
            TensorSpec(
                "boxes",
                "FP32",
                (n_anchors, 4),
                "decoded anchor boxes (z, y, x, d): centre and cube edge in patch voxels",
            ),
            TensorSpec("scores", "FP32", (n_anchors,), "nodule probability of each box, [0, 1]"),
        ),
        input_spacing=(params.spacing_mm,) * 3,
        normalisation=params.normalisation,
        overlap=params.overlap,
        labels=(NODULE_LABEL,),
        sample=lambda seed: chest_patch(
            params.window, params.spacing_mm, params.normalisation, seed
        ),
        sample_name="synthetic chest CT patch around a nodule",
        decoding=Decoding(
            divisor=params.divisor,
            score_threshold=params.score_threshold,
            pre_nms_top_k=params.pre_nms_top_k,
            nms_iou=params.nms_iou,
            max_detections=params.max_detections,
            min_diameter_mm=params.min_diameter_mm,
            anchor_strides=tuple(cfg.anchors.strides),
            anchor_sizes=tuple(cfg.anchors.sizes),
            lung_mask=params.lung_mask,
            lung_margin_mm=params.lung_margin_mm,
        ),
        provenance=provenance,
    )


class SegmenterInference(torch.nn.Module):
    """``patches (B, 1, Z, Y, X)`` → class probabilities ``(B, C, Z, Y, X)`` (softmax in the
    graph); A&D's Diff-VNet runs its test-time path, the image stem, encoder and D_θ."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(patches), dim=1)


def _segmenter(state: Mapping[str, Any], path: Path) -> Exportable:
    """An A&D / supervised / mean-teacher segmenter checkpoint (``kind: medssl.segmenter``)."""
    try:
        cfg = config_from_dict(SegmentationExperiment, state["config"])
        classes = {int(k): str(v) for k, v in state["classes"].items()}
    except (KeyError, ValueError, ConfigError) as exc:
        raise CheckpointError(
            path, f"the checkpoint's config or classes are missing or invalid ({exc})"
        ) from exc
    try:
        net = inference_net(state)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(path, f"weights do not fit the configured network ({exc})") from exc
    params = segmentation_params(cfg, len(classes))
    z, y, x = params.window
    grid = "x".join(f"{s:g}" for s in params.spacing_mm)
    provenance = {
        **dict(state.get("provenance") or {}),
        "method": cfg.method,
        "setting": cfg.setting,
        "network": cfg.model.network,
        "step": state.get("step"),
        "validation_metrics": dict(state.get("metrics") or {}),
    }
    return Exportable(
        module=SegmenterInference(net).eval(),
        task=Task.SEGMENTATION,
        input=TensorSpec(
            "patches",
            "FP32",
            (1, z, y, x),
            f"image patch (channel, z, y, x) on {grid} mm voxels, normalised to [-1, 1]",
        ),
        outputs=(
            TensorSpec(
                "probabilities",
                "FP32",
                (len(classes), z, y, x),
                "softmax class probabilities per voxel, class 0 background",
            ),
        ),
        input_spacing=params.spacing_mm,
        normalisation=params.normalisation,
        overlap=params.overlap,
        labels=tuple(organ_label(c, n) for c, n in sorted(classes.items()) if c > 0),
        sample=lambda seed: organ_patch((z, y, x), params.spacing_mm, params.normalisation, seed),
        sample_name="synthetic abdominal CT patch around the liver",
        provenance=provenance,
    )


#: checkpoint ``kind`` → builder.
EXPORTERS: dict[str, Callable[[Mapping[str, Any], Path], Exportable]] = {
    CheckpointKind.DETECTOR.value: _detector,
    CheckpointKind.SEGMENTER.value: _segmenter,
}


def exportable(state: Mapping[str, Any], path: str | Path) -> Exportable:
    """The :class:`Exportable` of a loaded checkpoint.

    Raises:
        ExportError: the checkpoint's ``kind`` is absent or not one medssl exports.
        CheckpointError: its config or weights are broken.
    """
    kind = state.get("kind")
    if kind is None:
        raise ExportError(
            f"{path}: not a medssl checkpoint (no 'kind' key); export checkpoints "
            f"written by medssl-train (checkpoints/best.pt or last.pt)"
        )
    if kind not in EXPORTERS:
        raise ExportError(
            f"{path}: unknown model type {kind!r}; medssl-export knows {sorted(EXPORTERS)}"
        )
    return EXPORTERS[kind](state, Path(path))
