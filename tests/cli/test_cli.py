"""The `medssl` commands end to end: synth, index, info, evaluate; medssl-train's listing."""

from __future__ import annotations

import json
import subprocess
import sys

import highdicom as hd
import numpy as np
import pytest
from click.testing import CliRunner

from medssl.cli.main import cli
from medssl.datasets.luna16 import Luna16
from medssl.index import index_tree
from medssl.io import read_dicom_series
from medssl.volume import Volume
from tests.conftest import assert_same_in_world

pytestmark = [pytest.mark.integration]

SMALL = ["--matrix", "96", "--slices", "40"]


def test_synth_chest_dicom_studies_validate_and_index(tmp_path, dciodvfy):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["synth", "chest", "--cases", "3", "--format", "dicom", str(out), *SMALL]
    )
    assert result.exit_code == 0, result.output
    index = index_tree(out)
    assert len(index.series) == 3 and len({s.study_uid for s in index.series}) == 3
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 3 * 40
    errors = {f.name: e for f in files if (e := dciodvfy(f))}
    assert errors == {}
    for series in index.series:
        ours = read_dicom_series(series.files)
        volume = hd.get_volume_from_series([hd.imread(f) for f in series.files])
        theirs = Volume(volume.array.astype(np.float32), volume.affine)
        assert_same_in_world(ours, theirs)
    assert (out / "annotations.csv").read_text().count("\n") > 3


def test_synth_chest_luna16_centres_land_in_their_nodules(tmp_path):
    out = tmp_path / "luna"
    result = CliRunner().invoke(
        cli, ["synth", "chest", "--cases", "20", "--format", "luna16", str(out), *SMALL]
    )
    assert result.exit_code == 0, result.output
    luna = Luna16(out)
    assert len(luna.seriesuids) == 20
    checked = 0
    for uid in luna.seriesuids:
        mask = luna.nodule_mask(uid)
        for k, nodule in enumerate(luna.annotations(uid), start=1):
            z, y, x = np.round(mask.world_to_index(nodule.centre_lps)).astype(int)
            assert mask.array[z, y, x] == k, f"{uid} nodule {k} centre is outside its mask"
            checked += 1
    assert checked >= 20


def test_synth_organs_writes_decathlon(tmp_path):
    from medssl.datasets.decathlon import Decathlon

    out = tmp_path / "organs"
    result = CliRunner().invoke(
        cli,
        [
            "synth",
            "organs",
            "--cases",
            "2",
            "--test",
            "1",
            "--domain",
            "mr",
            "--shape",
            "32",
            "48",
            "48",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = Decathlon(out)
    assert data.modality == "MR" and len(data.training) == 2 and len(data.test) == 1
    assert len(data.labels) >= 6
    assert data.image(data.training[0]).shape == (32, 48, 48)


def test_info_json(tmp_path, dicom_series, volume):
    result = CliRunner().invoke(cli, ["info", str(dicom_series), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary) >= {"shape", "affine", "origin", "spacing", "direction", "min", "max"}
    assert summary["shape"] == list(volume.shape)
    assert np.allclose(summary["affine"], volume.affine)
    assert summary["min"] == float(volume.array.min())


def test_info_text(dicom_series):
    result = CliRunner().invoke(cli, ["info", str(dicom_series)])
    assert result.exit_code == 0
    assert "shape:       [6, 20, 24]" in result.stdout


def test_train_command_lists_the_detector_trainers():
    helped = subprocess.run(
        [f"{sys.prefix}/bin/medssl-train", "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0
    assert "focalmix" in helped.stdout and "supervised-det" in helped.stdout


def test_unlabeled_pool_has_scans_but_no_annotations(tmp_path):
    out = tmp_path / "pool"
    result = CliRunner().invoke(
        cli,
        [
            "synth",
            "chest",
            "--cases",
            "1",
            "--unlabeled",
            "2",
            str(out),
            "--matrix",
            "64",
            "--slices",
            "24",
        ],
    )
    assert result.exit_code == 0, result.output
    luna = Luna16(out)
    unlabeled = sorted((out / "unlabeled").glob("*.mhd"))
    assert len(luna.seriesuids) == 1 and len(unlabeled) == 2
    assert {a.series_uid for a in luna.annotations()} == set(luna.seriesuids)
    assert not {p.stem for p in unlabeled} & set(luna.seriesuids)
