"""A trained segmenter exported (card, parity) and scored through medssl-score: label maps on
the source grid whose Dice equals the trainer's own test evaluation, volumes per label, and a
valid DICOM SEG for DICOM input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from medssl.io import SeriesInfo, write_dicom_series
from medssl.io.nifti import read_nifti
from medssl.metrics.segmentation import dice
from medssl.models.card import ModelCard, Task, load_card
from medssl.scoring import RunnerSpec, ScoreOptions, SelectionRules, score
from medssl.scoring.series import DicomOutput
from medssl.synth.organs import generate_organ_phantom
from tests.conftest import ORGAN_SHAPE

pytestmark = [pytest.mark.integration]


def test_exported_segmenter_card_names_organs_with_codes_and_colours(exported_segmenter):
    card = load_card(exported_segmenter.model_dir)
    assert card.task is Task.SEGMENTATION
    assert [label.value for label in card.labels] == list(range(1, 12))
    liver = card.labels[0]
    assert (liver.name, liver.type.value, liver.category.value) == ("liver", "10200004", "91723000")
    assert liver.colour is not None
    assert card.outputs[0].shape == (12, 16, 32, 32)
    assert card.input_spacing == (8.0, 3.0, 3.0)
    assert card.provenance["method"] == "ad" and card.provenance["setting"] == "imbssl"
    assert "test_metrics" in card.provenance
    assert exported_segmenter.parity.passed
    assert ModelCard.from_json(card.to_json()) == card


def test_scored_label_maps_match_the_trainers_own_dice(seg_run, exported_segmenter, tmp_path):
    """Acceptance: Dice from medssl-score's output files equals the trainer's evaluation."""
    out = tmp_path / "scores"
    summary = score(
        seg_run.parent / "A",
        out,
        RunnerSpec(exported_segmenter.repository, "organs"),
        options=ScoreOptions(workers=0),
    )
    assert summary.counts == {"ok": 2}
    trainer = json.loads((seg_run / "test" / "metrics.json").read_text())
    for label in (1, 2, 7):  # liver, spleen, stomach
        ours = []
        for case in ("organs_0005", "organs_0006"):
            pred = read_nifti(out / "labels" / f"{case}.nii.gz", label=True)
            truth = read_nifti(seg_run.parent / "A" / "labelsTs" / f"{case}.nii.gz", label=True)
            assert pred.shape == truth.shape and np.allclose(pred.affine, truth.affine)
            ours.append(dice(pred.array == label, truth.array == label))
        assert abs(np.mean(ours) - trainer["classes"][str(label)]["dice"]["mean"]) < 0.01
    volumes = pq.read_table(out / "findings.parquet").to_pylist()
    assert len(volumes) == 2 * 11
    liver = next(r for r in volumes if r["key"] == "organs_0005" and r["label"] == "liver")
    pred = read_nifti(out / "labels" / "organs_0005.nii.gz", label=True)
    expected = (pred.array == 1).sum() * np.prod(pred.spacing) / 1000
    assert liver["volume_ml"] == pytest.approx(expected, rel=1e-6)


def test_scoring_a_dicom_series_writes_a_valid_seg(exported_segmenter, tmp_path, dciodvfy):
    import highdicom as hd

    case = generate_organ_phantom(11, "A", shape=ORGAN_SHAPE)
    series = tmp_path / "dicom" / "series"
    write_dicom_series(case.image, series, SeriesInfo(uid_seed="organ-seg-test"))
    out = tmp_path / "scores"
    # Abdominal series are 4 mm thick; the default rules are the lung-screening ones (<= 2.5 mm).
    summary = score(
        tmp_path / "dicom",
        out,
        RunnerSpec(exported_segmenter.repository, "organs"),
        SelectionRules(max_thickness_mm=5.0),
        options=ScoreOptions(workers=0, dicom=DicomOutput(out / "dicom")),
    )
    assert summary.counts == {"ok": 1}
    row = pq.read_table(out / "series.parquet").to_pylist()[0]
    seg_path = Path(row["dicom_outputs"])
    assert dciodvfy(seg_path) == []
    seg = hd.seg.segread(seg_path)
    assert seg.number_of_segments == 11
    description = seg.get_segment_description(1)
    assert description.segment_label == "liver"
    assert "RecommendedDisplayCIELabValue" in description
    # The SEG's frames carry exactly the label map medssl-score wrote for that series.
    labels = read_nifti(Path(row["label_map"]), label=True)
    volume = seg.get_volume(combine_segments=True, skip_overlap_checks=True)
    assert int((volume.array > 0).sum()) == int((labels.array > 0).sum())


def test_medssl_score_prints_the_label_volumes_of_a_segmenter(
    seg_run, exported_segmenter, tmp_path
):
    from click.testing import CliRunner

    from medssl.cli.score import score as score_command

    result = CliRunner().invoke(
        score_command,
        [
            str(seg_run.parent / "A"),
            "--repository",
            str(exported_segmenter.repository),
            "--model",
            "organs",
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "label volumes, mL" in result.output
    assert "liver" in result.output and "organs_0005" in result.output


def test_medssl_score_starts_from_the_series_the_card_says_the_model_is_for(
    exported_segmenter, tmp_path
):
    """A card's ``selection`` (here: up to 5 mm slices) is medssl-score's default; ``--select``
    replaces it key by key; a card without one keeps the thin-slice defaults."""
    import shutil

    from click.testing import CliRunner

    from medssl.cli.score import score as score_command

    case = generate_organ_phantom(13, "A", shape=ORGAN_SHAPE)  # 4 mm slices
    write_dicom_series(case.image, tmp_path / "dicom" / "series", SeriesInfo(uid_seed="select"))
    plain = tmp_path / "plain"
    shutil.copytree(exported_segmenter.repository, plain)
    thick = tmp_path / "thick"
    shutil.copytree(exported_segmenter.repository, thick)
    card_path = thick / "organs" / "1" / "medssl.json"
    card = json.loads(card_path.read_text())
    assert card["selection"] == {}
    card_path.write_text(json.dumps(card | {"selection": {"max_thickness_mm": 5.0}}))

    def status(repository: Path, *select: str) -> str:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        args = [str(tmp_path / "dicom"), "--repository", str(repository), "--model", "organs"]
        args += ["--out", str(out), "--workers", "0", *select]
        result = CliRunner().invoke(score_command, args)
        assert result.exit_code == 0, result.output
        row = pq.read_table(out / "series.parquet").to_pylist()[0]
        return row["status"] + (f": {row['error']}" if row["error"] else "")

    assert status(plain) == "skipped: 4 mm slices, thicker than 2.5 mm"
    assert status(thick) == "ok"
    assert status(thick, "--select", "min_slices=8") == "ok"  # the card's 5 mm stays
    assert status(thick, "--select", "max_thickness_mm=3") == (
        "skipped: 4 mm slices, thicker than 3 mm"
    )


def test_medssl_score_writes_a_labelmap_seg_when_asked(exported_segmenter, tmp_path):
    """``--write-dicom --seg-type labelmap``: a LABELMAP SEG holding the label
    map medssl-score wrote; the default stays BINARY with empty frames omitted."""
    import highdicom as hd
    from click.testing import CliRunner

    from medssl.cli.score import score as score_command

    case = generate_organ_phantom(12, "A", shape=ORGAN_SHAPE)
    write_dicom_series(case.image, tmp_path / "dicom" / "series", SeriesInfo(uid_seed="labelmap"))
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"max_thickness_mm": 5.0}))
    for extra, kind in (([], "BINARY"), (["--seg-type", "labelmap"], "LABELMAP")):
        out = tmp_path / kind
        result = CliRunner().invoke(
            score_command,
            [
                str(tmp_path / "dicom"),
                "--repository",
                str(exported_segmenter.repository),
                "--model",
                "organs",
                "--out",
                str(out),
                "--workers",
                "0",
                "--select",
                str(rules),
                "--write-dicom",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        row = pq.read_table(out / "series.parquet").to_pylist()[0]
        seg = hd.seg.segread(row["dicom_outputs"])
        assert seg.SegmentationType == kind
        labels = read_nifti(Path(row["label_map"]), label=True)
        assert int(seg.NumberOfFrames) < ORGAN_SHAPE[0] * 11  # empty frames omitted
        volume = seg.get_volume(combine_segments=True, skip_overlap_checks=True)
        assert int((volume.array > 0).sum()) == int((labels.array > 0).sum())


def test_an_abdominal_dicom_study_from_synth_organs_scores_to_a_seg_in_the_cards_colours(
    exported_segmenter, tmp_path, dciodvfy
):
    """The segmentation path end to end: `medssl synth organs --format dicom` → `medssl-score
    --write-dicom` → a BINARY SEG that dciodvfy accepts and highdicom reads back with every
    segment in its card label's display colour."""
    import subprocess
    import sys

    import highdicom as hd

    study = tmp_path / "abdomen"
    subprocess.run(
        [
            f"{sys.prefix}/bin/medssl",
            "synth",
            "organs",
            "--cases",
            "1",
            "--format",
            "dicom",
            "--shape",
            *map(str, ORGAN_SHAPE),
            "--seed",
            "21",
            str(study),
        ],
        check=True,
        capture_output=True,
    )
    out = tmp_path / "scores"
    done = subprocess.run(
        [
            f"{sys.prefix}/bin/medssl-score",
            str(study),
            "--out",
            str(out),
            "--workers",
            "0",
            "--repository",
            str(exported_segmenter.repository),
            "--model",
            "organs",
            "--select",
            "max_thickness_mm=5,min_slices=16,body_part=ABDOMEN",
            "--write-dicom",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    row = pq.read_table(out / "series.parquet").to_pylist()[0]
    assert row["status"] == "ok"
    seg_path = Path(row["dicom_outputs"])
    assert dciodvfy(seg_path) == []
    seg = hd.seg.segread(seg_path)
    card = load_card(exported_segmenter.model_dir)
    assert seg.number_of_segments == len(card.labels)
    for label in card.labels:
        description = seg.get_segment_description(label.value)
        assert description.segment_label == label.name
        shown = hd.color.CIELabColor.from_dicom_value(
            description.RecommendedDisplayCIELabValue
        ).to_rgb()
        assert max(abs(int(a) - int(b)) for a, b in zip(shown, label.colour)) <= 1, label.name
