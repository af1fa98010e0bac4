"""DICOM SEG size and write time: dense vs sparse BINARY vs LABELMAP.

The study: a 300 x 512 x 512 CT series written by medssl's DICOM writer, with the 11 organ
labels of medssl's synthetic abdomen (``medssl synth organs``: liver, spleen, kidneys,
aorta, IVC, stomach, gallbladder, pancreas, adrenal glands). The phantom is generated at a
quarter of the resolution in each axis (75 x 128 x 128 at the organ domain's 4 x 3 x 3 mm)
and its labels repeated 4x per axis onto the 1 x 0.75 x 0.75 mm grid of the study, a typical
abdominal CT matrix.

Writers, each measured on the same label volume (file bytes and seconds to build the SEG and
write the file, medians of ``--repeats`` runs, alternated):

* medssl ``label_seg`` BINARY dense (every frame: medssl's earlier default),
  BINARY sparse (empty frames omitted: the default now), LABELMAP (empty frames omitted),
  uncompressed and RLE Lossless;
* the peer: dcmqi's ``itkimage2segimage`` (PyPI ``dcmqi``; the converter 3D Slicer uses) on
  the same labels as NIfTI, BINARY and LABELMAP, empty slices skipped (its default). Its time
  includes reading the 300 source files and the NIfTI, which medssl's does not (the gateway
  and scorer hold the headers already).

Every output is read back with highdicom and compared with the labels (all must agree),
and the BINARY ones are validated with dciodvfy (LABELMAP is newer than dciodvfy 2022).
Prints a table and writes ``benchmarks/results/seg_size.json`` and ``.md``.

    python benchmarks/seg_size.py [--repeats 3] [--workdir /tmp/medssl-seg-bench] [--no-dcmqi]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom

from medssl import Volume
from medssl.bench.machine import cpu_device
from medssl.dicom.seg import frame_slices, write_label_seg
from medssl.io import SeriesInfo, write_dicom_series
from medssl.io.nifti import write_nifti
from medssl.models import load_card
from medssl.models.anatomy import organ_label
from medssl.models.card import ModelCard, Task, TensorSpec
from medssl.synth.organ_scene import LABELS
from medssl.synth.organs import generate_organ_phantom

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]

#: medssl's variants: name -> write_label_seg options.
VARIANTS: dict[str, dict[str, Any]] = {
    "medssl BINARY dense": {"seg_type": "binary", "omit_empty_frames": False},
    "medssl BINARY sparse (default)": {"seg_type": "binary", "omit_empty_frames": True},
    "medssl LABELMAP": {"seg_type": "labelmap", "omit_empty_frames": True},
    "medssl LABELMAP RLE": {"seg_type": "labelmap-rle", "omit_empty_frames": True},
}
#: dcmqi's variants: name -> itkimage2segimage --segmentationType.
DCMQI_VARIANTS = {"dcmqi BINARY (skip empty)": "binary", "dcmqi LABELMAP (skip empty)": "labelmap"}


def organ_card() -> ModelCard:
    """A segmentation card for the 11 organs of ``medssl synth organs`` (codes and colours
    from :mod:`medssl.models.anatomy`); the rest is the shipped detector's card, reshaped."""
    base = load_card(ROOT / "model_repository" / "focalmix-nodules")
    labels = tuple(organ_label(value, name) for value, name in LABELS.items())
    output = TensorSpec("logits", "FP32", (len(labels) + 1, *base.patch_size), "class logits")
    return dataclasses.replace(
        base,
        name="organs",
        task=Task.SEGMENTATION,
        decoding=None,
        outputs=(output,),
        labels=labels,
        operating_point=None,
    )


def organ_study(
    folder: Path, shape: tuple[int, int, int], factor: int = 4, seed: int = 0
) -> tuple[list[Path], Volume]:
    """A CT series of ``shape`` in ``folder`` and its organ labels on the same grid.

    The phantom is made at ``shape // factor`` on the organ domain's grid and repeated
    ``factor`` times per axis (spacing divided by ``factor``). Returns the series' files (in
    slice order) and the label Volume (uint8, :data:`LABELS` codes, affine of the series).
    """
    small = tuple(int(n) // factor for n in shape)
    case = generate_organ_phantom(seed, "A", shape=small)
    affine = case.label.affine.copy()
    affine[:3, :3] /= factor
    affine[:3, 3] -= (factor - 1) / (2 * factor) * case.label.affine[:3, :3].sum(axis=1)
    labels = case.label.array
    image = case.image.array.astype(np.float32)
    for axis in range(3):
        labels = np.repeat(labels, factor, axis=axis)
        image = np.repeat(image, factor, axis=axis)
    info = SeriesInfo(uid_seed=f"seg-size-{shape}")
    paths = write_dicom_series(Volume(image, affine), folder, info)
    return paths, Volume(labels.astype(np.uint8), affine.copy())


def _dcmqi_metadata(card: ModelCard, path: Path) -> Path:
    """itkimage2segimage's metadata JSON: one segment per card label, with its codes."""

    def code(c) -> dict[str, str]:
        return {"CodeValue": c.value, "CodingSchemeDesignator": c.scheme, "CodeMeaning": c.meaning}

    path.write_text(
        json.dumps(
            {
                "ContentCreatorName": "medssl^benchmark",
                "ClinicalTrialSeriesID": "1",
                "ClinicalTrialTimePointID": "1",
                "ClinicalTrialCoordinatingCenterName": "medssl",
                "SeriesDescription": "organs (dcmqi)",
                "SeriesNumber": "9102",
                "InstanceNumber": "1",
                "BodyPartExamined": "ABDOMEN",
                "segmentAttributes": [
                    [
                        {
                            "labelID": label.value,
                            "SegmentDescription": label.name,
                            "SegmentLabel": label.name,
                            "SegmentAlgorithmType": "AUTOMATIC",
                            "SegmentAlgorithmName": card.name,
                            "SegmentedPropertyCategoryCodeSequence": code(label.category),
                            "SegmentedPropertyTypeCodeSequence": code(label.type),
                            "recommendedDisplayRGBValue": list(label.colour or (128, 128, 128)),
                        }
                        for label in card.labels
                    ]
                ],
                "ContentLabel": "SEGMENTATION",
                "ContentDescription": "organs",
            }
        )
    )
    return path


def read_back(path: Path, sop_uids: list[str]) -> np.ndarray:
    """The SEG at ``path`` as a ``(frames, Y, X)`` map of segment numbers, frames in
    ``sop_uids`` order (highdicom; missing frames must be empty)."""
    seg = hd.seg.segread(path)
    # LABELMAP SEGs describe the background as segment 0
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence if int(item.SegmentNumber)]
    masks = seg.get_pixels_by_source_instance(
        sop_uids,
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
        ignore_spatial_locations=True,
    )  # dcmqi does not state SpatialLocationsPreserved
    out = np.zeros(masks.shape[:3], np.uint8)
    for i, number in enumerate(numbers):
        out[masks[..., i] > 0] = number
    return out


def _dciodvfy_errors(path: Path) -> int | None:
    exe = shutil.which("dciodvfy")
    if exe is None:
        return None
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, check=False)
    return sum(line.startswith("Error") for line in (result.stdout + result.stderr).splitlines())


def run(
    shape: tuple[int, int, int],
    repeats: int,
    workdir: Path,
    factor: int = 4,
    dcmqi: bool = True,
    validate: bool = True,
) -> dict[str, Any]:
    """Write the study, then every variant ``repeats`` times (alternated); returns the rows
    (bytes, frames, median/min seconds, read-back agreement, dciodvfy errors) and the study's
    facts (shape, label frames, empty fraction)."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    card = organ_card()
    paths, labels = organ_study(workdir / "ct", shape, factor)
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    sop_uids = [str(ds.SOPInstanceUID) for ds in source]
    frames = np.asarray(labels.array)[frame_slices(source, labels.affine, labels.shape[0])]
    present = np.stack([(frames == label.value).any(axis=(1, 2)) for label in card.labels])
    writers: dict[str, Any] = {
        name: (lambda out, o=options: write_label_seg(source, frames, card, out, **o))
        for name, options in VARIANTS.items()
    }
    exe = shutil.which("itkimage2segimage") or str(
        Path(sys.executable).parent / "itkimage2segimage"
    )
    if dcmqi and Path(exe).exists():
        nifti = write_nifti(labels, workdir / "labels.nii.gz")
        meta = _dcmqi_metadata(card, workdir / "meta.json")
        for name, kind in DCMQI_VARIANTS.items():
            writers[name] = lambda out, k=kind: subprocess.run(
                [
                    exe,
                    "--inputImageList",
                    str(nifti),
                    "--inputDICOMDirectory",
                    str(workdir / "ct"),
                    "--outputDICOM",
                    str(out),
                    "--inputMetadata",
                    str(meta),
                    "--segmentationType",
                    k,
                    "--useLabelIDAsSegmentNumber",
                ],
                check=True,
                capture_output=True,
            )
    seconds: dict[str, list[float]] = {name: [] for name in writers}
    for _rep in range(repeats):
        for name, write in writers.items():
            out = workdir / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}.dcm"
            out.unlink(missing_ok=True)
            start = time.perf_counter()
            write(out)
            seconds[name].append(time.perf_counter() - start)
    rows = []
    for name in writers:
        out = workdir / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}.dcm"
        ds = pydicom.dcmread(out, stop_before_pixels=True)
        row = {
            "writer": name,
            "bytes": out.stat().st_size,
            "frames": int(ds.NumberOfFrames),
            "segmentation_type": str(ds.SegmentationType),
            "transfer_syntax": str(ds.file_meta.TransferSyntaxUID.name),
            "seconds_median": statistics.median(seconds[name]),
            "seconds_min": min(seconds[name]),
            "seconds_all": seconds[name],
        }
        if validate:
            row["read_back_equal"] = bool(np.array_equal(read_back(out, sop_uids), frames))
            row["dciodvfy_errors"] = (
                _dciodvfy_errors(out)
                if ds.SegmentationType == "BINARY"
                else "n/a (LABELMAP is newer than dciodvfy 2022)"
            )
        rows.append(row)
    return {
        "shape": list(shape),
        "labels": len(card.labels),
        "repeats": repeats,
        "label_frames_dense": int(present.size),
        "label_frames_non_empty": int(present.sum()),
        "empty_fraction": round(1.0 - float(present.sum()) / present.size, 4),
        "slices_with_any_label": int(present.any(axis=0).sum()),
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    dense = next(r["bytes"] for r in result["rows"] if r["writer"] == "medssl BINARY dense")
    lines = [
        "| writer | type | frames | MB | x dense | write s (median) | write s (min) | "
        "read back = labels | dciodvfy errors |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['writer']} | {r['segmentation_type']} | {r['frames']} | "
            f"{r['bytes'] / 1e6:.1f} | {r['bytes'] / dense:.3f} | "
            f"{r['seconds_median']:.2f} | "
            f"{r['seconds_min']:.2f} | {r.get('read_back_equal', '-')} | "
            f"{r.get('dciodvfy_errors', '-')} |"
        )
    return "\n".join(lines)


def notes(result: dict[str, Any]) -> str:
    """What the table shows, from its numbers."""
    rows = {r["writer"]: r for r in result["rows"]}
    dense, sparse = rows["medssl BINARY dense"], rows["medssl BINARY sparse (default)"]
    labelmap = rows["medssl LABELMAP"]
    lines = [
        f"- Omitting empty frames (the default) keeps {sparse['frames']} of "
        f"{dense['frames']} frames: "
        f"{sparse['bytes'] / dense['bytes']:.2f}x the bytes of the dense SEG, written "
        f"{dense['seconds_median'] / sparse['seconds_median']:.1f}x faster (medians). The saving "
        f"is the empty fraction: {100 * result['empty_fraction']:.0f} % here; a study that is 91 % "
        f"empty (an 11-organ label SEG of a real 300 x 512 x 512 CT) keeps about a tenth.",
        f"- LABELMAP (uncompressed, 8 bits per pixel) is "
        f"{labelmap['bytes'] / sparse['bytes']:.2f}x "
        f"the sparse BINARY SEG: one byte per pixel of every labelled slice outweighs one bit per "
        f"pixel of each non-empty (slice, label) pair unless slices hold > 8 labels on average.",
    ]
    rle = rows.get("medssl LABELMAP RLE")
    if rle is not None:
        lines.append(
            f"- LABELMAP with RLE Lossless frames (`seg_type: labelmap-rle`) is "
            f"{rle['bytes'] / 1e6:.1f} MB: {rle['bytes'] / sparse['bytes']:.3f}x the sparse "
            f"BINARY SEG, {rle['bytes'] / dense['bytes']:.3f}x the dense one, for receivers that "
            f"read LABELMAP and accept RLE. The labels here are the phantom's repeated 4x per "
            f"axis, long runs that suit RLE; real masks compress less."
        )
    peer = rows.get("dcmqi BINARY (skip empty)")
    if peer is not None:
        lines.append(
            f"- dcmqi's converter writes the same frames ({peer['frames']}, "
            f"{peer['bytes'] / sparse['bytes']:.3f}x medssl's bytes) in "
            f"{peer['seconds_median']:.1f} s (median, including reading the series and NIfTI) "
            f"against medssl's {sparse['seconds_median']:.1f} s."
        )
    lines.append(
        "- Timings are from a 2-core machine shared with other jobs; the min column is "
        "the least disturbed run. Every output read back equal to the labels (highdicom)."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medssl-seg-bench"))
    parser.add_argument("--no-dcmqi", action="store_true", help="Leave out dcmqi's converter.")
    args = parser.parse_args()
    result = run(tuple(args.shape), args.repeats, args.workdir, dcmqi=not args.no_dcmqi)
    result["device"] = cpu_device()
    result["versions"] = {
        "highdicom": hd.__version__,
        "pydicom": pydicom.__version__,
        "numpy": np.__version__,
    }
    text = table(result)
    head = (
        f"# seg_size\n\n{result['device']}; medians of {args.repeats} runs, alternated\n\n"
        f"Study: {' x '.join(map(str, result['shape']))} CT, {result['labels']} organ labels; "
        f"{result['label_frames_non_empty']} of {result['label_frames_dense']} (frame, label) "
        f"pairs non-empty ({100 * result['empty_fraction']:.0f} % empty); "
        f"{result['slices_with_any_label']} of {result['shape'][0]} slices hold a label.\n\n"
    )
    text += "\n\n" + notes(result)
    print(head + text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "seg_size.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "seg_size.md").write_text(head + text + "\n")
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.sync()


if __name__ == "__main__":
    main()
