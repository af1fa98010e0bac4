"""Evaluation metrics, torch-free: LUNA16 FROC and CPM (``noduleCADEvaluationLUNA16.py``),
and per-class segmentation metrics (Dice, Jaccard, HD95, ASD)."""

from medssl.metrics.froc import (
    CPM_FP_POINTS,
    FP_RATES,
    bootstrap_sensitivities,
    cpm,
    froc_curve,
    order_statistic_interval,
    sensitivities_at,
)
from medssl.metrics.luna16 import (
    FrocResult,
    Prediction,
    evaluate_luna16,
    evaluate_luna16_files,
    plot_froc,
    read_predictions,
    read_seriesuids,
    write_predictions,
)
from medssl.metrics.segmentation import (
    ClassMetrics,
    segmentation_metrics,
    summarize_cases,
)

__all__ = [
    "CPM_FP_POINTS",
    "FP_RATES",
    "ClassMetrics",
    "FrocResult",
    "Prediction",
    "bootstrap_sensitivities",
    "cpm",
    "evaluate_luna16",
    "evaluate_luna16_files",
    "froc_curve",
    "order_statistic_interval",
    "plot_froc",
    "read_predictions",
    "read_seriesuids",
    "segmentation_metrics",
    "sensitivities_at",
    "summarize_cases",
    "write_predictions",
]
