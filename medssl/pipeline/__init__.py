"""The inference pipeline shared by training evaluation, batch scoring and the gateway.

One implementation of each step: preparing a scan for any model
(:func:`~medssl.pipeline.preprocess.prepare`),
sliding windows, the lung mask (:mod:`~medssl.pipeline.lungmask`), detection
post-processing and segmentation blending/resampling.
"""

from medssl.pipeline.detect import (
    DetectionParams,
    DetectionResult,
    DetectionRunner,
    detect,
    detect_preprocessed,
)
from medssl.pipeline.lungmask import LungMaskParams, lung_mask
from medssl.pipeline.preprocess import (
    Intensity,
    PercentileIntensity,
    Preparation,
    normalisation_from_json,
    prepare,
    resample_to_spacing,
)
from medssl.pipeline.segment import (
    Blending,
    Normalisation,
    SegmentationParams,
    SegmentationResult,
    SegmentationRunner,
    importance_map,
    largest_component,
    segment,
    segment_prepared,
    segment_preprocessed,
)
from medssl.pipeline.windows import extract_window, plan_windows

__all__ = [
    "Blending",
    "DetectionParams",
    "DetectionResult",
    "DetectionRunner",
    "Intensity",
    "LungMaskParams",
    "Normalisation",
    "PercentileIntensity",
    "Preparation",
    "SegmentationParams",
    "SegmentationResult",
    "SegmentationRunner",
    "detect",
    "detect_preprocessed",
    "extract_window",
    "importance_map",
    "largest_component",
    "lung_mask",
    "normalisation_from_json",
    "plan_windows",
    "prepare",
    "resample_to_spacing",
    "segment",
    "segment_prepared",
    "segment_preprocessed",
]
