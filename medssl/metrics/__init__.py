"""Evaluation metrics, torch-free: LUNA16 FROC and CPM (``noduleCADEvaluationLUNA16.py``; the CPM
read at exactly 1/8 ... 8 FP/scan by default, as the LUNA16 paper), paired bootstrap comparisons and
per-candidate labels, probability calibration (Platt/temperature, ECE), and per-class segmentation
metrics (Dice, Jaccard, HD95, ASD)."""

from medssl.metrics.calibration import (
    Calibration,
    expected_calibration_error,
    fit_calibration,
    reliability_diagram,
)
from medssl.metrics.froc import (
    CPM_DEFINITIONS,
    CPM_FP_POINTS,
    FP_RATES,
    CpmDefinition,
    FrocVectors,
    bootstrap_sensitivities,
    cpm,
    cpm_points,
    froc_curve,
    order_statistic_interval,
    paired_bootstrap_sensitivities,
    sensitivities_at,
    threshold_froc,
)
from medssl.metrics.luna16 import (
    MAX_MARKS_PER_SCAN,
    FrocResult,
    PairedDifference,
    evaluate_luna16,
    evaluate_luna16_files,
    froc_at_thresholds,
    label_candidates,
    paired_bootstrap_cpm,
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
    "CPM_DEFINITIONS",
    "CPM_FP_POINTS",
    "FP_RATES",
    "MAX_MARKS_PER_SCAN",
    "Calibration",
    "ClassMetrics",
    "CpmDefinition",
    "FrocResult",
    "FrocVectors",
    "PairedDifference",
    "bootstrap_sensitivities",
    "cpm",
    "cpm_points",
    "evaluate_luna16",
    "evaluate_luna16_files",
    "expected_calibration_error",
    "fit_calibration",
    "froc_at_thresholds",
    "froc_curve",
    "label_candidates",
    "order_statistic_interval",
    "paired_bootstrap_cpm",
    "paired_bootstrap_sensitivities",
    "plot_froc",
    "read_predictions",
    "read_seriesuids",
    "reliability_diagram",
    "segmentation_metrics",
    "sensitivities_at",
    "summarize_cases",
    "threshold_froc",
    "write_predictions",
]
