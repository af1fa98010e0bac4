"""Run a trained detector through the shared pipeline and score it the LUNA16 way.

The PyTorch runner implements :class:`medssl.pipeline.detect.DetectionRunner`, so
validation here, batch scoring and the gateway share pre- and post-processing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch

from medssl.finding import Finding
from medssl.metrics import FrocResult, evaluate_luna16
from medssl.pipeline import Intensity
from medssl.pipeline.detect import DetectionParams, detect_preprocessed
from medssl.training.cache import CachedVolume
from medssl.training.detection.config import DetectionExperiment
from medssl.training.networks.detector import DetectorInference, FPNDetector

__all__ = ["TorchDetectionRunner", "detection_params", "evaluate", "predict"]


class TorchDetectionRunner:
    """PyTorch runner: ``(B, 1, W, W, W)`` float32 → ``boxes (B, N, 4)``, ``scores (B, N)``.

    Args:
        detector: the trained network (put in eval mode here).
        window: window edge, voxels.
        device: where to run; bf16 autocast on CUDA when ``amp``.
    """

    def __init__(
        self,
        detector: FPNDetector,
        window: int,
        device: torch.device | str = "cpu",
        amp: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.net = DetectorInference(detector, (window,) * 3).to(self.device).eval()
        self.amp = amp and self.device.type == "cuda"

    @torch.no_grad()
    def __call__(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)).to(self.device)
        context = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
        with context:
            boxes, scores = self.net(x)
        return boxes.float().cpu().numpy(), scores.float().cpu().numpy()


def detection_params(cfg: DetectionExperiment, batch_size: int = 2) -> DetectionParams:
    """The pipeline parameters of an experiment (also written to the model card)."""
    return DetectionParams(
        spacing_mm=cfg.data.spacing_mm,
        normalisation=Intensity(cfg.data.hu_min, cfg.data.hu_max),
        window=cfg.window,
        divisor=cfg.model.strides[-1],
        overlap=cfg.eval.overlap,
        batch_size=batch_size,
        score_threshold=cfg.eval.score_threshold,
        nms_iou=cfg.eval.nms_iou,
        max_detections=cfg.eval.max_detections,
        lung_mask=cfg.eval.lung_mask,
    )


def predict(
    runner: TorchDetectionRunner, volumes: Mapping[str, CachedVolume], params: DetectionParams
) -> list[Finding]:
    """Detections of every cached scan as LUNA16 submission rows (LPS mm)."""
    rows = []
    for uid, cached in volumes.items():
        result = detect_preprocessed(cached.to_volume(), runner, params)
        rows += [replace(d, series_uid=uid) for d in result.detections]
    return rows


def evaluate(
    predictions: Sequence[Finding],
    nodules: Sequence[Finding],
    excluded: Sequence[Finding],
    seriesuids: Sequence[str],
    bootstrap: int,
    seed: int = 0,
) -> FrocResult:
    """LUNA16 FROC/CPM of ``predictions`` on the scans ``seriesuids``."""
    return evaluate_luna16(
        nodules, excluded, seriesuids, predictions, n_bootstrap=bootstrap, seed=seed
    )
