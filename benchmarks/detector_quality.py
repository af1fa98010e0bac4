"""Detector quality and what each false-positive control buys.

A detector of a model repository (default ``model_repository/focalmix-nodules``) is scored
through the pipeline ``medssl-score`` runs (:func:`medssl.scoring.series.prepare_series` +
:func:`~medssl.scoring.series.infer`, onnxruntime :class:`~medssl.runners.onnx.OnnxRunner`,
the card's :class:`~medssl.pipeline.detect.DetectionParams`) on a synthetic test set of the
generator's *held-out* family (``medssl synth chest --family heldout``: other parameter ranges
and seeds than the training family), generated into ``--data`` if missing: ``--cases`` scans
(default 40, the minimum for a CPM whose interval can separate the rows) at ``--matrix`` 512
(realistic 512² geometry; a smaller ``--cases``/``--matrix`` makes a smoke run, and the report
says so).

Rows:

* ``shipped``: the model as its card says (lung mask, calibration, operating point);
* inference-side ablations, the same exported model with one :class:`DetectionParams` switch
  changed (:func:`inference_ablations`): ``lung mask off`` (every window runs, no finding is
  dropped for lying outside the lungs; ``lung mask on`` for a card without it). Calibration is
  monotone: without it the ranking, CPM, sensitivities and the marks at the operating point
  (chosen on the calibrated scale) are the same, only the probabilities are not, so its
  ablation is a column, the ECE of the raw scores (``ECE raw``), not a second inference pass;
* training-side ablations, other model repositories the lead trained (``--variant NAME=PATH``,
  PATH a model folder holding ``medssl.json``, e.g. ``--variant "no hard negatives=/tmp/nohn/
  model_repository/focalmix-nodules"``), scored with their own cards.

Per row: CPM (LUNA16, the paper's exact-rate definition) with its 95 % bootstrap interval over
scans, sensitivity at 1 FP per scan, marks per scan at the operating point (findings with
probability >= the card's threshold, :meth:`~medssl.models.card.ModelCard.report_threshold`:
what the SR carries), ECE of the reported probabilities against the LUNA16 label of every
mark (:func:`medssl.metrics.label_candidates`; marks on excluded findings left out), windows
per scan (mean) and seconds per scan (median of read + preprocess + inference + postprocess).
The shipped row also gets a reliability diagram, and a peer timing: the same windows through
a plain onnxruntime loop (no pipeline around it) on ``--peer-scans`` scans, with the ratio.

Writes ``benchmarks/results/detector_quality.{json,md}`` (``--results``) and prints the table.

    python benchmarks/detector_quality.py [--model model_repository/focalmix-nodules] \\
        [--data /tmp/medssl-quality/heldout] [--cases 40] [--matrix 512] \\
        [--variant "no hard negatives=PATH"] [--variant "no BN re-estimation=PATH"] [--threads 2]
    python benchmarks/detector_quality.py --smoke --cases 2 --matrix 128 --data /tmp/q-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medssl.bench.data import generated_dataset
from medssl.bench.machine import cpu_device
from medssl.datasets.luna16 import Luna16
from medssl.finding import Finding
from medssl.metrics import (
    FP_RATES,
    evaluate_luna16,
    froc_at_thresholds,
    label_candidates,
)
from medssl.metrics.calibration import expected_calibration_error, reliability_diagram
from medssl.models.card import load_card
from medssl.pipeline.detect import DetectionParams
from medssl.pipeline.windows import extract_window, plan_windows
from medssl.runners.onnx import OnnxRunner
from medssl.scoring.manifest import build_manifest
from medssl.scoring.result import SeriesStatus
from medssl.scoring.series import infer, prepare_series

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
#: The smallest full test set: >= 40 held-out scans at 512^2 (fewer scans leave the CPM
#: interval too wide to separate the rows; ``--smoke`` runs below it and the report says so).
MIN_CASES = 40
MIN_MATRIX = 512


def inference_ablations(params: DetectionParams) -> dict[str, dict[str, Any]]:
    """The inference-side rows of a card's parameters: ``DetectionParams`` fields to replace.

    The lung mask is switched to the other setting than the card's (off if the card uses it,
    on if not: both tell what it buys). Calibration gets no row: it is monotone, and its effect
    (the ECE before and after) is read off every row (``ece_uncalibrated``).
    """
    return {f"lung mask {'off' if params.lung_mask else 'on'}": {"lung_mask": not params.lung_mask}}


@dataclass(frozen=True)
class Variant:
    """One row: a model folder (``<repository>/<name>`` holding ``medssl.json``) and the
    DetectionParams fields replaced for this row."""

    name: str
    model_dir: Path
    params: Mapping[str, Any]


def parse_variant(text: str) -> tuple[str, Path]:
    """``"NAME=PATH"`` → ``(NAME, PATH)``; PATH must be a model folder with ``medssl.json``.

    Raises:
        argparse.ArgumentTypeError: no ``=``, an empty name, or no card at PATH.
    """
    name, sep, path = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=PATH (a model folder)")
    folder = Path(path).expanduser()
    if not (folder / "medssl.json").is_file():
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: {folder} holds no medssl.json; give the model "
            "folder, e.g. /tmp/run/model_repository/focalmix-nodules"
        )
    return name.strip(), folder


def prepare_data(data: Path, *, cases: int, matrix: int, seed: int = 7000) -> dict[str, Any]:
    """Generate the held-out-family LUNA16 test folder if missing; check it otherwise.

    ``data/benchmark_data.json`` records how it was made; a folder made otherwise is an error
    (:func:`medssl.bench.data.generated_dataset`).

    Raises:
        SystemExit: the folder exists with other settings.
    """
    return generated_dataset(
        data, {"cases": cases, "matrix": matrix, "family": "heldout", "seed": seed}
    )


def score_variant(
    variant: Variant,
    data: Path,
    *,
    threads: int | None,
    batch_size: int,
    n_bootstrap: int,
    reliability: Path | None = None,
) -> dict[str, Any]:
    """Score every scan of ``data`` with ``variant`` through the scoring pipeline; its row.

    Returns:
        ``cpm``, ``cpm_ci``, ``sensitivities`` (at :data:`~medssl.metrics.FP_RATES`),
        ``sensitivity_at_1fp``, ``marks_per_scan`` (mean count at the operating point, and
        ``marks_per_scan_max``), ``ece``, ``windows_per_scan`` (mean), ``seconds_per_scan``
        (median), the threshold and its source, and counts.
    """
    runner = OnnxRunner.from_repository(
        variant.model_dir.parent, variant.model_dir.name, threads=threads
    )
    card = runner.card
    params = replace(card.detection_params(batch_size), **variant.params)
    luna = Luna16(data)
    items = build_manifest(data).items
    predictions: list[Finding] = []
    marks, windows, seconds = [], [], []
    passed: list[bool] = []
    threshold = card.report_threshold()
    try:
        for item in items:
            start = time.perf_counter()
            scored = infer(prepare_series(item, params), runner, card, params)
            seconds.append(time.perf_counter() - start)
            if scored.status is not SeriesStatus.OK or scored.threshold is None:
                raise RuntimeError(f"{variant.name}: scoring {item.key} failed: {scored.error}")
            windows.append(scored.n_windows)
            marks.append(len(scored.reported))  # what the SR/SEG carry
            predictions += [replace(f, series_uid=item.key) for f in scored.findings]
            passed += [f.probability >= scored.threshold.value for f in scored.findings]
    finally:
        runner.close()
    uids = [item.key for item in items]
    nodules = [f for u in uids for f in luna.annotations(u)]
    excluded = [f for u in uids for f in luna.excluded(u)]
    froc = evaluate_luna16(nodules, excluded, uids, predictions, n_bootstrap=n_bootstrap)
    by_group = sensitivity_by_group(
        nodules,
        [t for u in uids for t in luna.nodule_truth(u)],
        excluded,
        uids,
        predictions,
        threshold.value,
    )
    labels = label_candidates(nodules, excluded, uids, predictions)
    counted = labels >= 0
    false_marks = false_marks_per_scan(predictions, passed, labels, uids)
    probabilities = np.array([p.probability for p in predictions], dtype=float)[counted]
    ece = (
        expected_calibration_error(probabilities, labels[counted])
        if counted.any()
        else float("nan")
    )
    # The calibration is monotone, so switching it off changes no ranking, CPM or mark: only the
    # probabilities. Their ECE before calibration is the raw scores', recovered exactly.
    calibration = params.calibration
    raw = _uncalibrated(probabilities, calibration.a, calibration.b)
    ece_raw = expected_calibration_error(raw, labels[counted]) if counted.any() else float("nan")
    if reliability is not None and counted.any():
        reliability_diagram(
            probabilities, labels[counted], reliability, title=f"{variant.name}: reliability"
        )
    return {
        "name": variant.name,
        "model": str(variant.model_dir),
        "model_version": card.version,
        "params_changed": {k: _jsonable(v) for k, v in variant.params.items()},
        "cpm": froc.cpm,
        "cpm_ci": list(froc.cpm_ci),
        "cpm_definition": froc.cpm_definition,
        "sensitivities": list(froc.sensitivities),
        "sensitivity_at_1fp": froc.sensitivities[FP_RATES.index(1.0)],
        "threshold": threshold.value,
        "threshold_source": threshold.source,
        "marks_per_scan": statistics.mean(marks),
        "marks_per_scan_max": max(marks),
        "false_marks_per_scan_median": statistics.median(false_marks),
        "false_marks_per_scan_max": max(false_marks),
        "false_marks_per_scan_mean": statistics.mean(false_marks),
        "ece": ece,
        "ece_uncalibrated": ece_raw,
        "calibration": _jsonable(calibration),
        "n_marks_labelled": int(counted.sum()),
        "n_true_marks": int(labels[counted].sum()),
        "windows_per_scan": statistics.mean(windows),
        "seconds_per_scan": statistics.median(seconds),
        "n_scans": froc.n_scans,
        "n_nodules": froc.n_nodules,
        "sensitivity_at_operating_point": by_group.pop("all", {}).get("all", [float("nan")])[0],
        "sensitivity_at_operating_point_by": by_group,
    }


def false_marks_per_scan(
    predictions: Sequence[Finding],
    passed: Sequence[bool],
    labels: np.ndarray,
    uids: Sequence[str],
) -> list[int]:
    """False marks each scan's SR carries: reported marks (``passed``) that hit no nodule
    (LUNA16 label 0; marks on excluded findings, -1, are not counted), one count per ``uids``."""
    reported_false = np.asarray(passed, bool) & (np.asarray(labels) == 0)
    counts = dict.fromkeys(uids, 0)
    for bad, p in zip(reported_false, predictions):
        if bad and p.series_uid in counts:
            counts[p.series_uid] += 1
    return [counts[u] for u in uids]


#: Diameter groups (mm) of the size breakdown: Lung-RADS v2022's solid-nodule cut points.
SIZE_GROUPS: tuple[tuple[str, float, float], ...] = (
    ("< 6 mm", 0.0, 6.0),
    ("6-8 mm", 6.0, 8.0),
    ("8-15 mm", 8.0, 15.0),
    (">= 15 mm", 15.0, math.inf),
)


def size_group(diameter_mm: float) -> str:
    """The :data:`SIZE_GROUPS` name of a nodule diameter in mm."""
    return next(name for name, low, high in SIZE_GROUPS if low <= diameter_mm < high)


def sensitivity_by_group(
    nodules: Sequence[Any],
    truth: Sequence[Mapping[str, str]],
    excluded: Sequence[Any],
    uids: Sequence[str],
    predictions: Sequence[Finding],
    threshold: float,
) -> dict[str, dict[str, list[float]]]:
    """Which nodules the SR finds: the sensitivity at the operating point (marks with
    ``p >= threshold``, the LUNA16 hit rule), overall, per diameter group
    (:data:`SIZE_GROUPS`, from the annotations) and per value of each ``truth`` column.

    Args:
        nodules: the annotated nodules (``diameter_mm``); ``truth``: their ``truth.csv``
            columns, aligned (may be empty: then only ``"all"`` and ``"size"``).

    Returns:
        ``{"all": {"all": [sensitivity, n]}, "size": {group: [sensitivity, n], ...},
        column: {value: [sensitivity, n], ...}, ...}``; a size group without nodules is left out.
    """

    def sensitivity(group: Sequence[Any]) -> list[float]:
        sens, _ = froc_at_thresholds(list(group), excluded, uids, predictions, [threshold])
        return [float(sens[0]), len(group)]

    out = {"all": {"all": sensitivity(nodules)}}
    sizes = [size_group(n.diameter_mm) for n in nodules]
    out["size"] = {
        name: sensitivity([n for n, g in zip(nodules, sizes) if g == name])
        for name, _, _ in SIZE_GROUPS
        if name in sizes
    }
    if truth:
        for column in truth[0]:
            values = sorted({t[column] for t in truth})
            out[column] = {
                v: sensitivity([n for n, t in zip(nodules, truth) if t[column] == v])
                for v in values
            }
    return out


def _false_marks(row: Mapping[str, Any]) -> str:
    """``median (max)`` false marks per scan at the operating point; a dash for rows scored before
    this column existed."""
    if "false_marks_per_scan_median" not in row:
        return "—"
    return f"{row['false_marks_per_scan_median']:g} ({row['false_marks_per_scan_max']})"


def _uncalibrated(p: np.ndarray, a: float, b: float) -> np.ndarray:
    """Invert ``p = sigmoid(a * logit(raw) + b)`` (a > 0): the model's raw scores ``(N,)``."""
    q = np.clip(p, 1e-12, 1 - 1e-12)
    return 1.0 / (1.0 + np.exp(-((np.log(q / (1 - q)) - b) / a)))


def _resumed(
    results: Path, meta: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The rows and peer timing already in ``results``, if they were scored on the same test set.

    Raises:
        SystemExit: ``results`` was made on another test set (data, matrix or smoke flag).
    """
    if not results.is_file():
        return [], None
    old = json.loads(results.read_text())
    same = ("data", "matrix", "generator_family", "smoke")
    if any(old["meta"].get(k) != meta[k] for k in same):
        raise SystemExit(
            f"{results} was scored on another test set "
            f"({ {k: old['meta'].get(k) for k in same} }); give another --results or drop --resume"
        )
    return list(old["rows"]), old.get("peer")


def _jsonable(value: Any) -> Any:
    return value.to_json() if hasattr(value, "to_json") else value


def peer_timing(
    model_dir: Path, data: Path, *, scans: int, threads: int | None, batch_size: int
) -> dict[str, Any]:
    """Inference seconds per scan of the pipeline vs a plain onnxruntime loop over the same
    windows of the same preprocessed scans (no lung mask: every window; medians over ``scans``)."""
    runner = OnnxRunner.from_repository(model_dir.parent, model_dir.name, threads=threads)
    card = runner.card
    params = replace(card.detection_params(batch_size), lung_mask=False)
    pipeline_s, plain_s = [], []
    try:
        for item in build_manifest(data).items[:scans]:
            prepared = prepare_series(item, params)
            scored = infer(prepared, runner, card, params)
            pipeline_s.append(scored.timings["inference"])
            volume = prepared.volume
            assert volume is not None
            starts = plan_windows(volume.shape, params.window, params.overlap)
            start = time.perf_counter()
            for i in range(0, len(starts), params.batch_size):
                batch = np.stack(
                    [
                        extract_window(
                            volume.array, s, params.window, params.normalisation.pad_value
                        )
                        for s in starts[i : i + params.batch_size]
                    ]
                )[:, None]
                runner(batch)
            plain_s.append(time.perf_counter() - start)
    finally:
        runner.close()
    pipe, plain = statistics.median(pipeline_s), statistics.median(plain_s)
    return {
        "scans": len(pipeline_s),
        "pipeline_inference_s": pipe,
        "plain_onnxruntime_s": plain,
        "ratio": pipe / plain,
    }


def report(
    rows: Sequence[dict[str, Any]], meta: Mapping[str, Any], peer: Mapping[str, Any] | None
) -> str:
    """The markdown table (and the peer timing)."""
    title = "# Detector quality on the held-out generator family"
    if meta["smoke"]:
        title += " — SMOKE RUN, NOT A RESULT"
    lines = [
        title,
        "",
        f"Device: {meta['device']}; onnxruntime, {meta['threads'] or 'default'} thread(s); "
        f"test set {meta['data']}: {meta['n_scans']} scans, {meta['n_nodules']} nodules, "
        f"held-out family, matrix {meta['matrix']}. CPM by the LUNA16 paper's exact rates, "
        "95 % bootstrap over scans; marks: findings at or above the card's operating point "
        "(what the SR carries); ECE over every mark, labelled by the LUNA16 matching.",
        "",
        "| model | CPM | CPM 95 % CI | sens. @ 1 FP/scan | threshold | marks/scan (max) | "
        "false marks/scan median (max) | ECE | ECE raw | windows/scan | s/scan (median) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['cpm']:.3f} | [{r['cpm_ci'][0]:.3f}, {r['cpm_ci'][1]:.3f}] | "
            f"{r['sensitivity_at_1fp']:.3f} | {r['threshold']:.3f} ({r['threshold_source']}) | "
            f"{r['marks_per_scan']:.1f} ({r['marks_per_scan_max']}) | {_false_marks(r)} | "
            f"{r['ece']:.3f} | {r['ece_uncalibrated']:.3f} | "
            f"{r['windows_per_scan']:.0f} | {r['seconds_per_scan']:.1f} |"
        )
    shipped = next(
        (r for r in rows if r["name"] == "shipped" and r.get("sensitivity_at_operating_point_by")),
        None,
    )
    if shipped:
        lines += [
            "",
            f"Which nodules the shipped model's SR finds (sensitivity at its operating point, "
            f"{shipped['sensitivity_at_operating_point']:.3f} overall):",
            "",
            "| nodules | sensitivity | n |",
            "|---|---:|---:|",
        ]
        for column, groups in shipped["sensitivity_at_operating_point_by"].items():
            lines += [
                f"| {column} {value} | {sens:.3f} | {n:.0f} |"
                for value, (sens, n) in groups.items()
            ]
    if peer:
        lines += [
            "",
            f"Peer timing (shipped model, every window, {peer['scans']} scans, "
            f"medians): the pipeline's inference {peer['pipeline_inference_s']:.2f} "
            "s/scan vs a plain onnxruntime loop over the same windows "
            f"{peer['plain_onnxruntime_s']:.2f} s/scan: ratio {peer['ratio']:.2f}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=ROOT / "model_repository" / "focalmix-nodules",
        help="the shipped model's folder (holding medssl.json and version folders)",
    )
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a training-side ablation: another model folder (repeatable)",
    )
    parser.add_argument(
        "--no-inference-ablations",
        action="store_true",
        help="skip the lung mask and calibration switches on the shipped model",
    )
    parser.add_argument("--data", type=Path, default=Path("/tmp/medssl-quality/heldout"))
    parser.add_argument("--cases", type=int, default=MIN_CASES)
    parser.add_argument("--matrix", type=int, default=MIN_MATRIX)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per runner call")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument(
        "--peer-scans", type=int, default=3, help="scans of the peer timing (0: none)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"allow fewer than {MIN_CASES} scans or a matrix below {MIN_MATRIX}",
    )
    parser.add_argument("--results", type=Path, default=RESULTS / "detector_quality.json")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in --results (same test set), score only the missing ones",
    )
    args = parser.parse_args()
    if (args.cases < MIN_CASES or args.matrix < MIN_MATRIX) and not args.smoke:
        raise SystemExit(
            f"--cases {args.cases} / --matrix {args.matrix}: the full test set is "
            f">= {MIN_CASES} scans at {MIN_MATRIX}^2; pass --smoke for a smaller trial run"
        )
    if not (args.model / "medssl.json").is_file():
        raise SystemExit(
            f"--model {args.model}: no medssl.json there; give a model folder of a repository"
        )
    prepare_data(args.data, cases=args.cases, matrix=args.matrix)
    variants = [Variant("shipped", args.model, {})]
    if not args.no_inference_ablations:
        shipped = load_card(args.model / "medssl.json").detection_params(args.batch_size)
        variants += [
            Variant(f"shipped, {name}", args.model, change)
            for name, change in inference_ablations(shipped).items()
        ]
    variants += [Variant(name, path, {}) for name, path in args.variant]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": cpu_device(),
        "threads": args.threads,
        "data": str(args.data),
        "matrix": args.matrix,
        "generator_family": "heldout",
        "smoke": args.smoke,
    }
    rows, peer = _resumed(args.results, meta) if args.resume else ([], None)
    done = {r["name"] for r in rows}
    for variant in variants:
        if variant.name in done:
            print(f"== {variant.name}: kept from {args.results}", flush=True)
            continue
        print(f"== {variant.name}", flush=True)
        diagram = (
            args.results.with_name(args.results.stem + "_reliability.png")
            if variant.name == "shipped"
            else None
        )
        rows.append(
            score_variant(
                variant,
                args.data,
                threads=args.threads,
                batch_size=args.batch_size,
                n_bootstrap=args.bootstrap,
                reliability=diagram,
            )
        )
        meta.update(n_scans=rows[0]["n_scans"], n_nodules=rows[0]["n_nodules"])
        args.results.write_text(
            json.dumps({"meta": meta, "rows": rows, "peer": peer}, indent=2) + "\n"
        )
    if peer is None and args.peer_scans > 0:
        peer = peer_timing(
            args.model,
            args.data,
            scans=args.peer_scans,
            threads=args.threads,
            batch_size=args.batch_size,
        )
    meta.update(n_scans=rows[0]["n_scans"], n_nodules=rows[0]["n_nodules"])
    args.results.write_text(json.dumps({"meta": meta, "rows": rows, "peer": peer}, indent=2) + "\n")
    text = report(rows, meta, peer)
    args.results.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
