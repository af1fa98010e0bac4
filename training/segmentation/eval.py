"""Validation and test of segmentation models through the shared inference pipeline.

Validation runs on cached volumes (model grid) and reports the mean foreground Dice;
the test runs :func:`medssl.pipeline.segment` on each test image at its source
resolution and scores the result against ``labelsTs`` in mm (:mod:`medssl.metrics`) —
the same path ``medssl-score`` takes with the exported model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medssl.io.nifti import write_nifti
from medssl.metrics.segmentation import segmentation_metrics, summarize_cases
from medssl.pipeline.preprocess import Intensity, PercentileIntensity
from medssl.pipeline.segment import SegmentationParams, segment, segment_preprocessed
from medssl.training.segmentation.config import SegDataConfig, SegmentationExperiment
from medssl.training.segmentation.data import DomainCase, LabeledVolume

__all__ = [
    "TorchSegmentationRunner",
    "normalisation",
    "segmentation_params",
    "test_segmenter",
    "validate_segmenter",
]


def normalisation(cfg: SegDataConfig) -> Intensity | PercentileIntensity:
    """The intensity normalisation the config names (cache, pipeline and card share it)."""
    if cfg.normalisation == "percentile":
        return PercentileIntensity()
    return Intensity(cfg.hu_min, cfg.hu_max)


class TorchSegmentationRunner:
    """A PyTorch network as a :class:`~medssl.pipeline.SegmentationRunner`: normalised
    patches ``(B, 1, Z, Y, X)`` → softmax ``(B, C, Z, Y, X)`` float32, in eval mode."""

    def __init__(
        self, net: nn.Module, device: torch.device | str = "cpu", amp: bool = False
    ) -> None:
        self.net, self.device = net.eval(), torch.device(device)
        self.amp = amp and self.device.type == "cuda"

    @torch.no_grad()
    def __call__(self, patches: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)).to(self.device)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
        with ctx:
            logits = self.net(x)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()


def segmentation_params(
    cfg: SegmentationExperiment, n_classes: int, batch_size: int = 2
) -> SegmentationParams:
    """The pipeline parameters of a run: the training grid, patch and normalisation."""
    e = cfg.eval
    return SegmentationParams(
        spacing_mm=cfg.data.spacing_mm,
        normalisation=normalisation(cfg.data),
        window=cfg.data.patch,
        overlap=e.overlap,
        blending=e.blending,
        batch_size=batch_size,
        n_classes=n_classes,
        largest_component=tuple(range(1, n_classes)) if e.largest_component else (),
    )


def _dice(pred: np.ndarray, ref: np.ndarray, c: int) -> float:
    p, r = pred == c, ref == c
    total = p.sum() + r.sum()
    return 1.0 if total == 0 else float(2 * (p & r).sum() / total)


def validate_segmenter(
    net: nn.Module,
    volumes: Sequence[LabeledVolume],
    lookup: np.ndarray,
    params: SegmentationParams,
    device: torch.device,
    amp: bool,
) -> dict[str, float]:
    """Mean foreground Dice (and per class) on cached validation volumes, model grid."""
    runner = TorchSegmentationRunner(net, device, amp)
    per_class = np.zeros((len(volumes), params.n_classes - 1))
    for i, vol in enumerate(volumes):
        assert vol.label is not None
        pred = segment_preprocessed(vol.image.to_volume(), runner, params).argmax(axis=0)
        ref = lookup[np.asarray(vol.label.array)]
        per_class[i] = [_dice(pred, ref, c) for c in range(1, params.n_classes)]
    net.train()
    means = per_class.mean(axis=0)
    return {
        "dice": float(means.mean()),
        **{f"dice/{c}": float(d) for c, d in enumerate(means, start=1)},
    }


def test_segmenter(
    net: nn.Module,
    cases: Sequence[DomainCase],
    lookup: np.ndarray,
    params: SegmentationParams,
    names: Mapping[int, str],
    device: torch.device,
    amp: bool,
    out: Path,
) -> dict[str, Any]:
    """Segment every test case on its source grid, write ``predictions/<key>.nii.gz``,
    ``metrics.json`` (per class: Dice, Jaccard, HD95 mm, ASD mm, mean over cases) and
    ``cases.json`` (per case and class)."""
    out.mkdir(parents=True, exist_ok=True)
    runner = TorchSegmentationRunner(net, device, amp)
    labels = list(range(1, params.n_classes))
    per_case: dict[str, Any] = {}
    for case in cases:
        image = case.dataset.image(case.case)
        result = segment(image, runner, params)
        write_nifti(result.labels, out / "predictions" / f"{case.key}.nii.gz")
        truth = case.dataset.label(case.case)
        ref = lookup[np.asarray(truth.array, dtype=np.int64)]
        per_case[case.key] = segmentation_metrics(
            np.asarray(result.labels.array), ref, labels, image.spacing
        )
    report = {
        "classes_named": {str(c): n for c, n in names.items() if c},
        **summarize_cases(list(per_case.values())),
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = {
        key: {str(c): m.to_json() for c, m in metrics.items()} for key, metrics in per_case.items()
    }
    (out / "cases.json").write_text(json.dumps(rows, indent=2) + "\n")
    net.train()
    return report
