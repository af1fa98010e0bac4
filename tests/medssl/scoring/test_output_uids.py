"""Output UIDs follow content: the same inputs and settings give the same
Series and SOP Instance UIDs (retries stay idempotent); any change of what an SR or SEG
contains (threshold, companion SEG on or off, a finding moved or re-scored, the model
version, the source instances) gives new ones, never an earlier object's.

Objects are written through the writer both the scorer (``medssl-score --write-dicom``) and
the gateway use (:func:`medssl.scoring.series._write_sr` with a
:class:`~medssl.scoring.series.DicomOutput`), and read back with pydicom.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medssl import Volume, affine_from_geometry
from medssl.dicom.seg import write_label_seg
from medssl.finding import Finding
from medssl.io import SeriesInfo, write_dicom_series
from medssl.io.dicom_enhanced import write_enhanced_ct
from medssl.io.dicom_series import load_dicom_series
from medssl.models import load_card
from medssl.scoring.manifest import ScanItem
from medssl.scoring.series import DicomOutput, Prepared, _write_sr
from tests.paths import DETECTOR_DIR

CARD_DIR = DETECTOR_DIR
SHAPE = (8, 32, 32)
SPACING = (2.0, 1.0, 1.0)
#: Trials of the property test (each writes 3 to 6 SR/SEG objects of an 8 x 32 x 32 series).
TRIALS = 30


@pytest.fixture(scope="module")
def card():
    return load_card(CARD_DIR)


def _volume() -> Volume:
    return Volume(
        np.zeros(SHAPE, np.float32) - 1000.0, affine_from_geometry((-16.0, -16.0, -8.0), SPACING)
    )


def _item(paths: list[Path]) -> ScanItem:
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return ScanItem(
        key=str(ds.SeriesInstanceUID),
        paths=tuple(str(p) for p in paths),
        patient_id=str(ds.PatientID),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        modality="CT",
        n_slices=len(paths),
    )


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> tuple[ScanItem, Volume]:
    """An 8-slice 32 x 32 CT series written by medssl's writer, as a manifest row."""
    volume = _volume()
    paths = write_dicom_series(volume, tmp_path_factory.mktemp("ct"), SeriesInfo(uid_seed="uids"))
    return _item(paths), volume


def _detection(volume: Volume, zyx, diameter: float, probability: float) -> Finding:
    centre = tuple(float(c) for c in volume.index_to_world(np.asarray(zyx, dtype=float)))
    return Finding(
        centre_lps=centre,
        diameter_mm=float(diameter),
        probability=float(probability),
        centre_voxel=tuple(float(v) for v in zyx),
    )


def _write(folder: Path, series, detections, card, **output) -> dict[str, tuple[str, str]]:
    """Write the SR (and companion SEG) as scorer and gateway do; the UIDs read back:
    ``{"sr": (series, sop), "seg": (series, sop), "sr->seg": (sop,)}``."""
    item, volume = series
    prepared = Prepared(
        item,
        None,
        source_affine=volume.affine,
        source_shape=volume.shape,
        headers=load_dicom_series(list(item.paths)).headers,
    )
    files = _write_sr(prepared, detections, card, DicomOutput(folder, **output))
    uids: dict[str, tuple[str, ...]] = {}
    for written in files:
        ds = pydicom.dcmread(written.path)
        role = "seg" if ds.Modality == "SEG" else "sr"
        uids[role] = (str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        # what the writer says it wrote is what the file holds (the gateway reads no file back)
        assert (
            written.kind,
            written.sop_class_uid,
            written.series_instance_uid,
            written.sop_instance_uid,
        ) == (role, str(ds.SOPClassUID), *uids[role])
        if role == "sr":
            uids["sr->seg"] = tuple(
                str(sop.ReferencedSOPInstanceUID)
                for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                for ser in study.ReferencedSeriesSequence
                for sop in ser.ReferencedSOPSequence
                if sop.ReferencedSOPClassUID == pydicom.uid.SegmentationStorage
            )
    return uids


def _assert_all_differ(a: dict, b: dict, why: str) -> None:
    assert a["sr"][0] != b["sr"][0] and a["sr"][1] != b["sr"][1], f"SR UIDs shared after {why}"
    if "seg" in a and "seg" in b:
        assert a["seg"][1] != b["seg"][1] and a["seg"][0] != b["seg"][0], (
            f"SEG UIDs shared after {why}"
        )
        assert a["sr->seg"] != b["sr->seg"], f"the SRs reference one SEG after {why}"


# -- two reports of one series that must differ: threshold, companion SEG ---------------------


def test_reports_of_one_enhanced_ct_at_thresholds_0_5_and_1_0_get_different_uids(tmp_path, card):
    """4 nodule groups at --sr-threshold 0.5, "Nodule: Absent" at 1.0: two documents."""
    volume = _volume()
    path = write_enhanced_ct(volume, tmp_path / "ct" / "ct.dcm", SeriesInfo(uid_seed="enh"))
    series = (_item([path]), volume)
    found = [
        _detection(volume, (3, 10 + 3 * i, 12), 6.0, p)
        for i, p in enumerate((0.93, 0.81, 0.62, 0.55, 0.3))
    ]
    at_half = _write(tmp_path / "a", series, found, card, min_probability=0.5)
    at_one = _write(tmp_path / "b", series, found, card, min_probability=1.0)
    _assert_all_differ(at_half, at_one, "threshold 0.5 -> 1.0")
    assert at_half == _write(tmp_path / "c", series, found, card, min_probability=0.5)  # a retry


def test_scorer_report_and_gateway_report_with_companion_seg_get_different_uids(
    tmp_path, series, card
):
    """``medssl-score --write-dicom`` (no SEG) and the gateway (SEG as evidence) score the
    same series: two different documents, and the SEG's UIDs are its own."""
    _, volume = series
    found = [_detection(volume, (2 + i % 4, 8 + 4 * i, 20), 5.0, 0.99 - 0.01 * i) for i in range(4)]
    scorer = _write(tmp_path / "score", series, found, card, min_probability=0.5)
    gateway = _write(
        tmp_path / "gateway", series, found, card, min_probability=0.5, companion_seg=True
    )
    _assert_all_differ(scorer, gateway, "companion SEG off -> on")
    assert len(gateway["sr->seg"]) == 1 and gateway["sr->seg"][0] == gateway["seg"][1]
    assert not {*gateway["seg"]} & {*gateway["sr"], *scorer["sr"]}


# -- property: equal content, equal UIDs; different content, different UIDs --------------------


def _random_case(rng: np.random.Generator, volume: Volume) -> dict:
    n = int(rng.integers(0, 5))
    probabilities = np.sort(rng.uniform(0.05, 1.0, n))[::-1]
    found = [
        _detection(
            volume,
            (
                rng.uniform(1, SHAPE[0] - 2),
                rng.uniform(4, SHAPE[1] - 5),
                rng.uniform(4, SHAPE[2] - 5),
            ),
            rng.uniform(2.0, 8.0),
            p,
        )
        for p in probabilities
    ]
    return {
        "found": found,
        "min_probability": float(rng.choice([0.0, 0.25, 0.5, 0.75])),
        "companion_seg": bool(rng.integers(0, 2)),
        "version": int(rng.integers(1, 3)),
    }


KINDS = ("threshold", "companion", "version", "move", "rescore")


def _mutate(rng: np.random.Generator, case: dict, volume: Volume, kind: str) -> tuple[str, dict]:
    """A copy of ``case`` whose output content differs in one respect: ``kind`` (one of
    :data:`KINDS`), or ``"add"`` (a reported finding added) where nothing is reported to
    move or re-score."""
    reported = [i for i, d in enumerate(case["found"]) if d.probability >= case["min_probability"]]
    if kind in ("move", "rescore") and not reported:
        kind = "add"
    new = dict(case, found=list(case["found"]))
    if kind == "threshold":
        new["min_probability"] = float(
            rng.choice([t for t in (0.0, 0.25, 0.5, 0.75, 1.0) if t != case["min_probability"]])
        )
    elif kind == "companion":
        new["companion_seg"] = not case["companion_seg"]
    elif kind == "version":
        new["version"] = 3 - case["version"]
    elif kind == "add":
        new["found"] = [_detection(volume, (4, 16, 16), 5.0, 1.0), *case["found"]]
    else:
        i = int(rng.choice(reported))
        d = case["found"][i]
        if kind == "move":
            shift = np.zeros(3)
            shift[int(rng.integers(0, 3))] = float(rng.choice([-1, 1]) * rng.uniform(0.01, 1.0))
            new["found"][i] = dataclasses.replace(d, centre_lps=tuple(np.add(d.centre_lps, shift)))
        else:  # re-scored, still reported
            p = d.probability + (0.001 if d.probability <= 0.999 else -0.001)
            new["found"][i] = dataclasses.replace(d, probability=max(p, case["min_probability"]))
            if new["found"][i].probability == d.probability:
                new["found"][i] = dataclasses.replace(d, diameter_mm=d.diameter_mm + 0.5)
    return kind, new


def _noisy(case: dict) -> dict:
    """The same content as it may come back from a retry on another runner: every value off
    by float noise far below the stated key precision."""
    return dict(
        case,
        found=[
            dataclasses.replace(
                d,
                centre_lps=tuple(np.add(d.centre_lps, 1e-9)),
                diameter_mm=d.diameter_mm + 1e-10,
                probability=min(1.0, d.probability + 1e-11),
            )
            for d in case["found"]
        ],
    )


def test_uids_are_equal_exactly_when_content_is_equal_over_random_pairs(tmp_path, series, card):
    _, volume = series
    rng = np.random.default_rng(20261206)
    seen: dict[str, str] = {}  # SOP Instance UID -> what it was written for
    kinds = set()

    def write(case: dict, tag: str) -> dict:
        versioned = dataclasses.replace(card, version=case["version"])
        uids = _write(
            tmp_path / tag,
            series,
            case["found"],
            versioned,
            min_probability=case["min_probability"],
            companion_seg=case["companion_seg"],
        )
        reported = [
            (tuple(np.round(d.centre_lps, 3)), round(d.diameter_mm, 3), round(d.probability, 6))
            for d in case["found"]
            if d.probability >= case["min_probability"]
        ]
        what = repr((reported, case["min_probability"], case["companion_seg"], case["version"]))
        for role in ("sr", "seg"):
            if role in uids:
                assert seen.setdefault(uids[role][1], f"{role} {what}") == f"{role} {what}", (
                    "one SOP Instance UID for two different contents"
                )
        return uids

    for trial in range(TRIALS):
        case = _random_case(rng, volume)
        first = write(case, f"{trial}-a")
        assert write(_noisy(case), f"{trial}-b") == first, "a retry gave other UIDs"
        kind, changed = _mutate(rng, case, volume, KINDS[trial % len(KINDS)])
        kinds.add(kind)
        _assert_all_differ(first, write(changed, f"{trial}-c"), kind)
    assert kinds >= set(KINDS)


def test_a_series_that_gained_instances_gets_new_report_and_seg_uids(tmp_path, series, card):
    """Late instances: the re-run covers more evidence, so it is a new object."""
    item, volume = series
    found = [_detection(volume, (4, 16, 16), 6.0, 0.9)]
    partial = (dataclasses.replace(item, paths=item.paths[:-1]), volume)
    reordered = (dataclasses.replace(item, paths=item.paths[::-1]), volume)
    for companion in (False, True):
        complete = _write(
            tmp_path / f"all-{companion}", series, found, card, companion_seg=companion
        )
        _assert_all_differ(
            complete,
            _write(tmp_path / f"part-{companion}", partial, found, card, companion_seg=companion),
            "an instance more",
        )
        # the same instances listed in another order are the same evidence
        assert (
            _write(tmp_path / f"rev-{companion}", reordered, found, card, companion_seg=companion)[
                "sr"
            ]
            == complete["sr"]
        )


def test_label_segs_differ_by_masks_type_and_frames_and_repeat_on_retry(tmp_path, series, card):
    item, _volume = series
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in item.paths]
    labels = np.zeros(SHAPE, np.uint8)
    labels[3, 10:14, 10:14] = 1
    moved = np.roll(labels, 1, axis=2)

    def uids(masks, name, **options):
        ds = pydicom.dcmread(write_label_seg(source, masks, card, tmp_path / name, **options))
        return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)

    base = uids(labels, "a.dcm")
    assert uids(labels.copy(), "b.dcm") == base
    others = [
        uids(moved, "c.dcm"),
        uids(labels, "d.dcm", omit_empty_frames=False),
        uids(labels, "e.dcm", seg_type="labelmap"),
    ]
    every = [base, *others]
    assert len({u[0] for u in every}) == len({u[1] for u in every}) == len(every)
