"""Lean DICOM SEG: empty frames omitted by default, dense on request,
LABELMAP as an option, and the companion SEG's findings in display colours. Every output is
read back with highdicom (equal to the labels) and the BINARY ones pass dciodvfy.

The organ study and the read-back are those of ``benchmarks/seg_size.py``, run small here,
so the benchmark's measurement path is tested too.
"""

from __future__ import annotations

import dataclasses
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest

from benchmarks.seg_size import organ_card, organ_study, read_back, run
from medssl.dicom.seg import detection_seg, label_seg
from medssl.finding import Finding
from medssl.models import load_card
from medssl.scoring.manifest import ScanItem
from medssl.scoring.series import DicomOutput, _write_seg
from medssl.serving.config import RouteConfig
from tests.conftest import require_tool
from tests.paths import DETECTOR_DIR

CARD_DIR = DETECTOR_DIR
SHAPE = (16, 80, 80)  # the benchmark's study, small: phantom at 8 x 40 x 40, repeated 2x


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The benchmark's organ study at :data:`SHAPE`: files, label Volume, headers."""
    paths, labels = organ_study(tmp_path_factory.mktemp("organs"), SHAPE, factor=2)
    return paths, labels, [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def test_the_benchmark_writers_agree_with_the_labels_and_sparse_is_smaller(tmp_path, dciodvfy):
    result = run(SHAPE, repeats=1, workdir=tmp_path, factor=2, dcmqi=False)
    rows = {r["writer"]: r for r in result["rows"]}
    dense, sparse = rows["medssl BINARY dense"], rows["medssl BINARY sparse (default)"]
    labelmap = rows["medssl LABELMAP"]
    assert all(r["read_back_equal"] for r in rows.values())
    assert dense["frames"] == result["label_frames_dense"] == SHAPE[0] * 11
    assert sparse["frames"] == result["label_frames_non_empty"] < dense["frames"]
    assert sparse["bytes"] < dense["bytes"]
    assert labelmap["segmentation_type"] == "LABELMAP"
    assert labelmap["frames"] == result["slices_with_any_label"]
    rle = rows["medssl LABELMAP RLE"]
    assert rle["segmentation_type"] == "LABELMAP" and rle["transfer_syntax"] == "RLE Lossless"
    assert rle["frames"] == labelmap["frames"] and rle["bytes"] < sparse["bytes"] / 4
    for path in tmp_path.glob("medssl_BINARY*.dcm"):
        assert dciodvfy(path) == [], path.name


def test_label_seg_writes_empty_frames_only_when_asked(tmp_path, study, dciodvfy):
    _paths, labels, source = study
    card = organ_card()
    frames = np.asarray(labels.array)
    half = frames.copy()
    half[: SHAPE[0] // 2] = 0  # the first half of the slices holds no organ
    counts = {}
    for dense in (False, True):
        seg = label_seg(source, half, card, omit_empty_frames=not dense)
        path = tmp_path / f"{dense}.dcm"
        seg.save_as(path, enforce_file_format=True)
        assert dciodvfy(path) == []
        assert np.array_equal(read_back(path, [ds.SOPInstanceUID for ds in source]), half)
        counts[dense] = int(seg.NumberOfFrames)
    assert counts[True] == SHAPE[0] * len(card.labels)
    assert counts[False] == sum(
        int((half == label.value).any(axis=(1, 2)).sum()) for label in card.labels
    )


def test_labelmap_seg_keeps_the_card_segments_and_colours(tmp_path, study):
    _, labels, source = study
    card = organ_card()
    seg = label_seg(source, np.asarray(labels.array), card, seg_type="labelmap")
    path = tmp_path / "labelmap.dcm"
    seg.save_as(path, enforce_file_format=True)
    back = hd.seg.segread(path)
    assert back.SegmentationType == "LABELMAP"
    for label in card.labels:
        description = back.get_segment_description(label.value)
        assert description.segment_label == label.name
        expected = hd.color.CIELabColor.from_rgb(*label.colour).value
        assert tuple(description.RecommendedDisplayCIELabValue) == tuple(expected)
    assert np.array_equal(read_back(path, [ds.SOPInstanceUID for ds in source]), labels.array)


def test_companion_seg_findings_get_distinct_display_colours(
    tmp_path, dicom_series, volume, dciodvfy
):
    card = load_card(CARD_DIR)
    source = [
        pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(dicom_series.glob("*.dcm"))
    ]
    centres = [(1, 5, 5), (3, 10, 12), (4, 15, 18)]
    found = [
        Finding(
            centre_lps=tuple(float(c) for c in volume.index_to_world(np.array(zyx, float))),
            diameter_mm=3.0,
            probability=0.9 - 0.1 * i,
            centre_voxel=zyx,
        )
        for i, zyx in enumerate(centres)
    ]
    seg = detection_seg(source, found, card, volume.affine, volume.shape)
    path = tmp_path / "findings-seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy(path) == []
    back = hd.seg.segread(path)
    descriptions = [back.get_segment_description(i + 1) for i in range(len(found))]
    assert all("RecommendedDisplayCIELabValue" in d for d in descriptions)
    colours = [tuple(d.RecommendedDisplayCIELabValue) for d in descriptions]
    from medssl.dicom.seg import FINDING_COLOURS

    assert colours == [
        tuple(hd.color.CIELabColor.from_rgb(*FINDING_COLOURS[i]).value) for i in range(len(found))
    ]
    assert len(set(colours)) == len(found)


def test_the_scorer_and_gateway_pass_the_seg_type_and_refuse_unknown_ones(tmp_path, study):
    paths, labels, source = study
    card = organ_card()
    uid = str(source[0].SeriesInstanceUID)
    item = ScanItem(
        key=uid,
        paths=tuple(str(p) for p in paths),
        series_uid=uid,
        study_uid=str(source[0].StudyInstanceUID),
    )
    for seg_type, dense in (("labelmap", False), ("binary", True), ("labelmap-rle", False)):
        output = DicomOutput(tmp_path / seg_type, seg_type=seg_type, dense_seg=dense)
        written = _write_seg(item, source, labels, card, output)
        ds = pydicom.dcmread(written.path, stop_before_pixels=True)
        assert (written.kind, written.sop_instance_uid) == ("seg", str(ds.SOPInstanceUID))
        assert ds.SegmentationType == seg_type.split("-")[0].upper()
        assert (int(ds.NumberOfFrames) == SHAPE[0] * len(card.labels)) is dense
    with pytest.raises(ValueError, match=r"\['binary', 'labelmap', 'labelmap-rle'\], got 'rle'"):
        DicomOutput(tmp_path, seg_type="rle")
    assert RouteConfig(model="organs", seg_type="labelmap", dense_seg=True).seg_type == "labelmap"
    with pytest.raises(ValueError, match="'binary', 'labelmap' or 'labelmap-rle', got 'rle'"):
        RouteConfig(model="organs", seg_type="rle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seg_type must be one of"):
        label_seg(source, np.asarray(labels.array), dataclasses.replace(card), seg_type="rle")


def test_dcmqi_reads_the_sparse_segs_back_to_the_same_voxels(tmp_path, study, dicom_series, volume):
    """dcmqi's ``segimage2itkimage`` (what 3D Slicer converts SEGs with) rebuilds every segment
    of a sparse label SEG (half its slices empty, so omitted) and of a companion SEG at the
    voxels we wrote: compared in LPS mm, through each output image's own geometry."""
    import SimpleITK as sitk

    exe = require_tool("segimage2itkimage", "dcmqi", installer="pip install")
    _paths, labels, source = study
    half = np.asarray(labels.array).copy()
    half[: SHAPE[0] // 2] = 0
    card = load_card(CARD_DIR)
    ct = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(dicom_series.glob("*.dcm"))]
    found = [
        Finding(
            centre_lps=tuple(float(c) for c in volume.index_to_world(np.array(zyx, float))),
            diameter_mm=4.0,
            probability=0.9,
            centre_voxel=zyx,
        )
        for zyx in [(1, 5, 5), (4, 15, 18)]
    ]
    cases = [
        (
            "labels",
            label_seg(source, half, organ_card()),
            labels.affine,
            {label.value: half == label.value for label in organ_card().labels},
        ),
        (
            "spheres",
            detection_seg(ct, found, card, volume.affine, volume.shape),
            volume.affine,
            None,
        ),
    ]
    for name, seg, affine, expected in cases:
        path = tmp_path / f"{name}.dcm"
        seg.save_as(path, enforce_file_format=True)
        out = tmp_path / name
        out.mkdir()
        result = subprocess.run(
            [exe, "--inputDICOM", str(path), "--outputDirectory", str(out), "-t", "nrrd"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        if expected is None:  # the spheres: what highdicom reads from the same file
            back = hd.seg.segread(path)
            uids = [ds.SOPInstanceUID for ds in ct]
            expected = {
                i + 1: back.get_pixels_by_source_instance(
                    uids, segment_numbers=[i + 1], combine_segments=True
                ).astype(bool)
                for i in range(len(found))
            }
            assert all(mask.any() for mask in expected.values())
        for number, mask in expected.items():
            image = sitk.ReadImage(str(out / f"{number}.nrrd"))
            xyz = np.argwhere(sitk.GetArrayFromImage(image) > 0)[:, ::-1].astype(float)
            lps = (
                np.asarray(image.GetOrigin())
                + (
                    np.asarray(image.GetDirection()).reshape(3, 3)
                    @ (xyz * np.asarray(image.GetSpacing())).T
                ).T
            )
            index = np.linalg.inv(affine) @ np.c_[lps, np.ones(len(lps))].T
            got = {tuple(v) for v in np.rint(index[:3].T).astype(int)}
            assert got == {tuple(v) for v in np.argwhere(mask)}, (name, number)
