"""Evaluation metrics, torch-free: LUNA16 FROC and CPM (``noduleCADEvaluationLUNA16.py``)."""

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

__all__ = [
    "CPM_FP_POINTS",
    "FP_RATES",
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
    "sensitivities_at",
    "write_predictions",
]
