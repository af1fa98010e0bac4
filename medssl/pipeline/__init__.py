"""The inference pipeline shared by training evaluation, batch scoring and the gateway.

One implementation of each step: preprocessing (:mod:`~medssl.pipeline.preprocess`),
sliding windows, and detection post-processing.
"""

from medssl.pipeline.detect import (
    Detection,
    DetectionParams,
    DetectionResult,
    DetectionRunner,
    detect,
    detect_preprocessed,
)
from medssl.pipeline.preprocess import Intensity, preprocess_ct
from medssl.pipeline.windows import extract_window, plan_windows

__all__ = [
    "Detection",
    "DetectionParams",
    "DetectionResult",
    "DetectionRunner",
    "Intensity",
    "detect",
    "detect_preprocessed",
    "extract_window",
    "plan_windows",
    "preprocess_ct",
]
