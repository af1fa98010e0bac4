"""``medssl synth organs --format dicom``: abdominal CT studies a PACS or the gateway can take."""

from __future__ import annotations

import csv

import numpy as np
from click.testing import CliRunner

from medssl.cli.main import cli
from medssl.index import index_tree
from medssl.io import read_volume
from medssl.synth.organs import generate_organ_phantom


def test_organs_as_dicom_are_abdominal_ct_studies_with_their_truth_beside_them(tmp_path):
    out = tmp_path / "abd"
    result = CliRunner().invoke(
        cli,
        [
            "synth",
            "organs",
            "--cases",
            "1",
            "--test",
            "1",
            "--seed",
            "7",
            "--shape",
            "24",
            "64",
            "64",
            "--format",
            "dicom",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote 2 abdominal CT studies (truth in labels/ and cases.csv)" in result.output
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert [(r["case_id"], r["split"]) for r in rows] == [
        ("organs_0007", "training"),
        ("organs_0008", "test"),
    ]
    index = index_tree(out)
    assert len(index.series) == 2
    by_uid = {s.series_uid: s for s in index.series}
    for row, seed in zip(rows, (7, 8)):
        record = by_uid[row["series_uid"]]
        assert (record.modality, record.body_part, record.n_slices) == ("CT", "ABDOMEN", 24)
        assert record.slice_thickness == 4.0
        truth = generate_organ_phantom(seed, "A", shape=(24, 64, 64))
        image = read_volume(out / row["series_dir"])
        np.testing.assert_allclose(image.affine, truth.image.affine, atol=1e-4)
        np.testing.assert_array_equal(image.array, np.round(truth.image.array))
        label = read_volume(out / row["label"])
        np.testing.assert_array_equal(label.array, truth.label.array)
        np.testing.assert_allclose(label.affine, truth.image.affine, atol=1e-4)
    assert len({s.study_uid for s in index.series}) == 2  # one study per case


def test_organs_as_dicom_refuse_an_mr_domain(tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "synth",
            "organs",
            "--cases",
            "1",
            "--domain",
            "mr",
            "--format",
            "dicom",
            str(tmp_path / "x"),
        ],
    )
    assert result.exit_code == 2
    assert "MR" in result.output and "CT series only" in result.output
    assert not (tmp_path / "x").exists()
