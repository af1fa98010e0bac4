"""Batch scoring of CT archives (``medssl-score``): manifest, selection, engines, results.

Torch-free: models run through :mod:`medssl.runners` (embedded onnxruntime or Triton).
"""

from medssl.scoring.manifest import Layout, Manifest, ScanItem, build_manifest
from medssl.scoring.run import RunnerSpec, ScoreOptions, ScoreSummary, score
from medssl.scoring.select import SelectionRules, parse_rules, select_series

__all__ = [
    "Layout",
    "Manifest",
    "RunnerSpec",
    "ScanItem",
    "ScoreOptions",
    "ScoreSummary",
    "SelectionRules",
    "build_manifest",
    "parse_rules",
    "score",
    "select_series",
]
