"""The exported detector's operating point, measured again with the exported graph.

``medssl-export`` chooses the card's operating point (:mod:`medssl.metrics.operating_point`)
by running the ONNX model it just wrote (onnxruntime, CPU) through the shared pipeline
(:func:`medssl.pipeline.preprocess.prepare`, :func:`medssl.pipeline.detect.detect_preprocessed`,
the code ``medssl-score`` runs) on the run's validation scans: the ``validation`` list of the
run's ``split.json`` (``<run>/checkpoints/<ckpt>.pt`` → ``<run>/split.json``) in the LUNA16
folder the checkpoint's provenance names (``provenance.data``). The threshold is therefore
the one that holds for the probabilities the exported model reports.

Alternatively :func:`operating_point_from_run` takes the one medssl-train chose at the end of
training (``<run>/validation/operating_point.json``, PyTorch weights). The card's decoding
carries the run's calibration (:func:`run_calibration`), so the threshold is chosen on, and
applies to, the calibrated probabilities scoring reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from medssl.errors import ExportError, MedsslError
from medssl.finding import Finding
from medssl.metrics.calibration import Calibration
from medssl.metrics.operating_point import (
    OperatingPoint,
    OperatingPointError,
    OperatingRule,
    choose_operating_point,
)
from medssl.models.card import ModelCard

__all__ = [
    "RUN_CALIBRATION",
    "RUN_OPERATING_POINT",
    "operating_point_from_run",
    "operating_point_on_validation",
    "run_calibration",
    "run_folder",
    "validation_inputs",
]

#: Where medssl-train writes the operating point it chose, relative to the run folder.
RUN_OPERATING_POINT = Path("validation") / "operating_point.json"
#: Where medssl-train writes the calibration it fitted on the validation marks.
RUN_CALIBRATION = Path("validation") / "calibration.json"

_ALTERNATIVES = (
    "pass --operating-point-from-run to take the one chosen at the end of training, or "
    "--no-operating-point to export without one (scoring then reports from 0.5, with a warning)"
)


def run_folder(checkpoint: Path) -> Path | None:
    """The medssl-train run folder of ``checkpoint`` (``<run>/checkpoints/x.pt``), or None."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def _run(checkpoint: Path) -> Path:
    run = run_folder(checkpoint)
    if run is None:
        raise ExportError(
            f"{checkpoint} is not in a medssl-train run folder (<run>/checkpoints/): the "
            f"validation scans of its run are unknown, so no operating point can be chosen; "
            f"export the run folder, or {_ALTERNATIVES}"
        )
    return run


def run_calibration(checkpoint: Path) -> Calibration | None:
    """The calibration medssl-train fitted on the validation marks of ``checkpoint``'s run
    (``<run>/validation/calibration.json``), or None when the checkpoint is not in a run
    folder or the run has none (trained before runs fitted one).

    Raises:
        ExportError: the file exists but does not hold a calibration.
    """
    import json

    run = run_folder(checkpoint)
    path = None if run is None else run / RUN_CALIBRATION
    if path is None or not path.is_file():
        return None
    try:
        return Calibration.from_json(json.loads(path.read_text(encoding="utf-8"))["calibration"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{path}: not a calibration written by medssl-train ({exc})") from exc


def operating_point_from_run(checkpoint: Path) -> OperatingPoint:
    """The operating point medssl-train chose for ``checkpoint``'s run.

    Raises:
        ExportError: the checkpoint is not in a run folder, or the run has no readable
            ``validation/operating_point.json`` (the path named).
    """
    import json

    path = _run(checkpoint) / RUN_OPERATING_POINT
    if not path.is_file():
        raise ExportError(
            f"{path} is missing: the run was trained before medssl-train chose an operating "
            "point; drop --operating-point-from-run to choose one with the exported model"
        )
    try:
        return OperatingPoint.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a valid operating point ({exc})") from exc


def validation_inputs(
    checkpoint: Path, provenance: Mapping[str, Any], data: Path | None = None
) -> tuple[str, list[str], Path]:
    """What the operating point is chosen on, checked (before anything is exported): a
    description for the card and messages, the validation seriesuids and their LUNA16 folder.

    Args:
        checkpoint, provenance: the exported checkpoint and its provenance.
        data: a LUNA16 folder whose every scan validates the operating point, in place of the
            run's validation split (``split.json`` in the folder ``provenance["data"]``).

    Raises:
        ExportError: ``data`` is not a LUNA16 folder with scans (the layout error); or,
            without it: no run folder, no readable ``split.json``, no validation scans, or the
            data folder of ``provenance["data"]`` gone (what is missing named, with the
            alternatives).
    """
    from medssl.datasets.luna16 import Luna16
    from medssl.datasets.splits import read_split

    if data is not None:
        try:
            uids = Luna16(data).seriesuids
        except MedsslError as exc:
            raise ExportError(f"operating-point data: {exc}") from exc
        return f"every scan of {data}", list(uids), Path(data)
    split_path = _run(checkpoint) / "split.json"
    if not split_path.is_file():
        raise ExportError(
            f"{split_path} is missing: the run's validation scans are unknown; {_ALTERNATIVES}"
        )
    try:
        uids = list(read_split(split_path).validation)
    except MedsslError as exc:
        raise ExportError(f"{exc}; {_ALTERNATIVES}") from exc
    if not uids:
        raise ExportError(
            f"{split_path} lists no validation scans (data.n_validation 0); {_ALTERNATIVES}"
        )
    folder = provenance.get("data")
    if not folder or not Path(str(folder)).is_dir():
        raise ExportError(
            f"the training data folder of the checkpoint's provenance ({folder!r}) is gone; it "
            f"holds the {len(uids)} validation scans of {split_path}; restore it there, or "
            f"{_ALTERNATIVES}"
        )
    return f"the validation scans of {split_path} ({folder})", uids, Path(str(folder))


def operating_point_on_validation(
    onnx_path: Path,
    card: ModelCard,
    checkpoint: Path,
    provenance: Mapping[str, Any],
    *,
    rule: str | OperatingRule,
    target: float,
    data: Path | None = None,
) -> OperatingPoint:
    """Choose the operating point with the exported graph on the run's validation scans, or
    on every scan of ``data``.

    A run validates on scans like those it trained on. Where those differ from what the model
    will score (targeted one-lung reconstructions vs whole chests, which hold twice the lung
    and so about twice the false positives per scan), pass ``data``: scans of the deployment
    geometry, never the test set.

    Args:
        onnx_path: the exported ``model.onnx`` (onnxruntime, CPU).
        card: its card (pipeline parameters, decoding); its ``operating_point`` is ignored.
        checkpoint: the exported checkpoint, in ``<run>/checkpoints/``.
        provenance: the checkpoint's provenance; ``data`` is the LUNA16 folder it trained on.
        rule, target: see :func:`medssl.metrics.operating_point.choose_operating_point`.
        data: a LUNA16 folder whose every scan validates the operating point (see above).

    Raises:
        ExportError: ``data`` not a LUNA16 folder with scans; no run folder, no
            ``split.json``, no validation scans, the data folder gone or unreadable (what
            is missing named, with the alternatives), or no threshold meets the rule.
    """
    from medssl.datasets.luna16 import Luna16
    from medssl.pipeline.detect import detect_preprocessed
    from medssl.pipeline.preprocess import prepare
    from medssl.runners.onnx import OnnxRunner

    what, uids, data = validation_inputs(checkpoint, provenance, data)
    params = card.detection_params()
    runner = OnnxRunner(
        onnx_path, replace(card, operating_point=None), providers=["CPUExecutionProvider"]
    )
    predictions: list[Finding] = []
    try:
        luna = Luna16(data)
        for uid in uids:
            volume = prepare(luna.scan(uid), params)
            result = detect_preprocessed(volume, runner, params)
            predictions += [replace(d, series_uid=uid) for d in result.detections]
        nodules = [f for u in uids for f in luna.annotations(u)]
        excluded = [f for u in uids for f in luna.excluded(u)]
    except MedsslError as exc:
        raise ExportError(f"reading {what}: {exc}; {_ALTERNATIVES}") from exc
    finally:
        runner.close()
    try:
        return choose_operating_point(
            nodules,
            excluded,
            uids,
            predictions,
            rule=rule,
            target=target,
            source=(
                f"medssl-export: {onnx_path.name} in onnxruntime (CPU) on {len(uids)} scans: {what}"
            ),
        )
    except OperatingPointError as exc:
        raise ExportError(f"operating point: {exc}") from exc
