"""End of a detector run: calibration and the operating point, chosen on the validation scans.

After the best checkpoint is loaded and the test report written, :func:`write_operating_point`
runs the best weights on the validation scans through the shared pipeline
(:func:`medssl.training.detection.eval.predict`, the code scoring runs), then

1. labels each validation mark the LUNA16 way (:func:`medssl.metrics.label_candidates`:
   true positive, false positive, ignored) and fits a Platt calibration on the true and false
   positives (:func:`medssl.metrics.calibration.fit_calibration`; Guo et al. 2017 sec. 4.1);
2. chooses the operating point on the CALIBRATED probabilities, the ones scoring reports once
   the card carries the calibration (:func:`medssl.metrics.operating_point.choose_operating_point`,
   default rule: at most 1 false positive per scan);
3. writes ``<run>/validation/``: ``operating_point.json`` (what ``medssl-export
   --operating-point-from-run`` reads), ``calibration.json`` (what ``medssl-export`` puts into
   the card's decoding), ``froc.json`` (the validation FROC of the calibrated marks and the
   point), ``reliability.png`` and ``submission.csv`` (the calibrated validation marks);
4. adds ``at_validation_operating_point`` to the test report (``test/cpm.json``): the test
   set's sensitivity, FP/scan and marks per scan at the validation threshold.

When the validation marks hold only one class, no calibration can be fitted: the point is then
chosen on the raw scores and ``calibration.json`` records the identity with the reason (logged
as a warning). When no threshold meets the rule, or there is no validation scan, no
``operating_point.json`` is written and the reason is logged and put in the test report;
``medssl-export`` then measures one itself or stops with the reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.finding import Finding
from medssl.metrics import (
    evaluate_luna16,
    froc_at_thresholds,
    label_candidates,
    read_predictions,
    write_predictions,
)
from medssl.metrics.calibration import (
    Calibration,
    expected_calibration_error,
    fit_calibration,
    reliability_diagram,
)
from medssl.metrics.operating_point import (
    OperatingPoint,
    OperatingPointError,
    OperatingRule,
    choose_operating_point,
)
from medssl.training.cache import VolumeCache
from medssl.training.detection.config import DetectionExperiment
from medssl.training.detection.eval import TorchDetectionRunner, detection_params, predict
from medssl.training.detection.scans import DetectionSplit

__all__ = ["VALIDATION_DIR", "calibrated", "write_operating_point"]

log = logging.getLogger("medssl.training.detection.operating")

#: The run's sub-folder of validation results.
VALIDATION_DIR = "validation"


def calibrated(predictions: list[Finding], calibration: Calibration) -> list[Finding]:
    """``predictions`` with their probabilities mapped by ``calibration`` (order kept)."""
    if not predictions:
        return []
    probabilities = calibration.apply(np.array([p.probability for p in predictions], dtype=float))
    return [replace(p, probability=float(q)) for p, q in zip(predictions, probabilities)]


def _fit(
    marks: list[Finding], nodules: list[Finding], excluded: list[Finding], uids: list[str]
) -> tuple[Calibration, dict[str, Any]]:
    """Platt calibration on the labelled validation marks (ignored marks left out), and its
    report (ECE before and after, counts; the reason when it cannot be fitted)."""
    labels = (
        label_candidates(nodules, excluded, uids, marks) if marks else np.zeros(0, dtype=np.int8)
    )
    keep = labels >= 0
    raw = np.array([p.probability for p in marks], dtype=float)[keep]
    y = labels[keep].astype(float)
    report: dict[str, Any] = {"n_candidates": int(keep.sum()), "n_true_positives": int(y.sum())}
    try:
        calibration = fit_calibration(raw, y, method="platt")
    except ValueError as exc:
        log.warning(
            "validation calibration not fitted (%s): the operating point is chosen on the raw "
            "scores",
            exc,
        )
        return Calibration(), {
            **report,
            "calibration": Calibration().to_json(),
            "not_fitted": str(exc),
        }
    return calibration, {
        **report,
        "calibration": calibration.to_json(),
        "ece_raw": expected_calibration_error(raw, y),
        "ece_calibrated": expected_calibration_error(calibration.apply(raw), y),
    }


def _test_at(
    point: OperatingPoint, calibration: Calibration, split: DetectionSplit, test_dir: Path
) -> dict[str, Any]:
    """The test set's FROC at the validation threshold, from ``test/submission.csv``
    (raw scores, calibrated here)."""
    marks = calibrated(read_predictions(test_dir / "submission.csv"), calibration)
    nodules = [f for u in split.test for f in split.nodules(u)]
    excluded = [f for u in split.test for f in split.luna.excluded(u)]
    sens, fps = froc_at_thresholds(nodules, excluded, split.test, marks, [point.threshold])
    passed = sum(1 for m in marks if m.probability >= point.threshold)
    return {
        "threshold": point.threshold,
        "rule": point.rule.value,
        "target": point.target,
        "sensitivity": float(sens[0]),
        "fp_per_scan": float(fps[0]),
        "marks_per_scan": passed / len(split.test),
        "n_scans": len(split.test),
        "n_nodules": len(nodules),
    }


def write_operating_point(
    model: torch.nn.Module,
    split: DetectionSplit,
    cache: VolumeCache,
    cfg: DetectionExperiment,
    device: torch.device,
    out: Path,
    test_report: dict[str, Any] | None,
    *,
    rule: str | OperatingRule = OperatingRule.FP_PER_SCAN,
    target: float = 1.0,
) -> OperatingPoint | None:
    """Calibrate and choose the operating point on the validation scans (see the module doc).

    Args:
        model: the best weights (an :class:`~medssl.training.networks.detector.FPNDetector`).
        split: the run's scans; ``split.validation`` are used, ``split.test`` for the report.
        cache: the run's volume cache (preprocessed scans).
        cfg: the experiment (window, pipeline parameters).
        device: where the model runs.
        out: the run folder (``validation/`` is written; ``test/cpm.json`` updated).
        test_report: the test report (``test/cpm.json``'s content) to extend, or None.
        rule, target: see :func:`~medssl.metrics.operating_point.choose_operating_point`.

    Returns:
        The operating point, or None when none could be chosen (the reason logged and, with a
        test report, recorded in it).
    """
    folder = out / VALIDATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    uids = list(split.validation)
    if not uids:
        return _none(out, test_report, "the run has no validation scans (data.n_validation 0)")
    volumes = {u: cache.get(u, split.source(u).load) for u in uids}
    runner = TorchDetectionRunner(model, cfg.window, device, cfg.amp)
    raw = predict(runner, volumes, detection_params(cfg))
    nodules = [f for u in uids for f in split.nodules(u)]
    excluded = [f for u in uids for f in split.luna.excluded(u)]
    calibration, calibration_report = _fit(raw, nodules, excluded, uids)
    marks = calibrated(raw, calibration)
    (folder / "calibration.json").write_text(json.dumps(calibration_report, indent=2) + "\n")
    write_predictions(folder / "submission.csv", marks)
    labels = (
        label_candidates(nodules, excluded, uids, marks) if marks else np.zeros(0, dtype=np.int8)
    )
    keep = labels >= 0
    if keep.any():
        reliability_diagram(
            np.array([m.probability for m in marks])[keep],
            labels[keep].astype(float),
            folder / "reliability.png",
            title="Validation candidates (calibrated)",
        )
    try:
        point = choose_operating_point(
            nodules,
            excluded,
            uids,
            marks,
            rule=rule,
            target=target,
            source=(
                f"medssl-train: best checkpoint in PyTorch on the {len(uids)} validation scans "
                f"of {out / 'split.json'}"
            ),
        )
    except OperatingPointError as exc:
        return _none(out, test_report, str(exc))
    froc = evaluate_luna16(nodules, excluded, uids, marks, n_bootstrap=0)
    (folder / "froc.json").write_text(
        json.dumps({**froc.to_json(), "operating_point": point.to_json()}, indent=2) + "\n"
    )
    (folder / "operating_point.json").write_text(json.dumps(point.to_json(), indent=2) + "\n")
    log.info("operating point: %s", point.describe())
    if test_report is not None and split.test:
        test_report["at_validation_operating_point"] = _test_at(
            point, calibration, split, out / "test"
        )
        _rewrite(out / "test" / "cpm.json", test_report)
    return point


def _none(out: Path, test_report: dict[str, Any] | None, reason: str) -> None:
    log.warning(
        "no operating point chosen: %s; medssl-export will measure one itself or say why not",
        reason,
    )
    if test_report is not None:
        test_report["at_validation_operating_point"] = {"error": reason}
        _rewrite(out / "test" / "cpm.json", test_report)


def _rewrite(path: Path, report: Mapping[str, Any]) -> None:
    if path.parent.is_dir():
        path.write_text(json.dumps(dict(report), indent=2) + "\n")
