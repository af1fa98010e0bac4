"""LUNA16 and Decathlon layouts, DICOM trees as datasets, and reproducible splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medssl.datasets.decathlon import Decathlon, DecathlonWriter
from medssl.datasets.dicom_tree import DicomTree
from medssl.datasets.luna16 import Luna16, Luna16Writer
from medssl.datasets.splits import make_split, read_split, write_split
from medssl.errors import DatasetLayoutError, MedsslError
from medssl.finding import Finding
from medssl.index import index_tree, write_index
from medssl.io import write_dicom_series, write_nifti
from tests.conftest import ramp_volume


def test_luna16_round_trip(tmp_path):
    writer = Luna16Writer(tmp_path)
    scans = {}
    for k in range(12):
        uid = f"1.2.3.{k}"
        scans[uid] = ramp_volume()
        mask = np.zeros(scans[uid].shape, np.uint8)
        mask[2:4, 5:9, 5:9] = 1
        writer.add(
            uid,
            scans[uid],
            [Finding(series_uid=uid, centre_lps=(-80.0, -100.0, -245.0), diameter_mm=6.5)],
            excluded=[Finding(series_uid=uid, centre_lps=(-85.0, -101.0, -244.0), diameter_mm=2.0)],
            lung_mask=mask,
            nodule_mask=mask,
            negatives=[(-70.0, -90.0, -240.0)],
            truth=[{"kind": "solid"}],
        )
    writer.close()
    luna = Luna16(tmp_path)
    assert len(luna.seriesuids) == 12
    assert luna.subset_of("1.2.3.11") == 1 and (tmp_path / "subset9").is_dir()
    assert np.array_equal(luna.scan("1.2.3.4").array, scans["1.2.3.4"].array)
    assert np.allclose(luna.scan("1.2.3.4").affine, scans["1.2.3.4"].affine)
    [nodule] = luna.annotations("1.2.3.5")
    assert nodule.centre_lps == (-80.0, -100.0, -245.0) and nodule.diameter_mm == 6.5
    assert len(luna.excluded()) == 12
    assert sorted({c for _, c in luna.candidates("1.2.3.0")}) == [0, 1]
    assert luna.nodule_mask("1.2.3.0").array.sum() == 32
    assert (tmp_path / "seriesuids.csv").read_text().splitlines()[0] == "1.2.3.0"


def test_luna16_scans_are_stored_as_int16_hu(tmp_path):
    scan = ramp_volume()
    scan.array = scan.array + np.float32(0.4)
    writer = Luna16Writer(tmp_path)
    writer.add("s", scan, [])
    writer.close()
    assert "ElementType = MET_SHORT" in (tmp_path / "subset0" / "s.mhd").read_text()
    assert np.array_equal(Luna16(tmp_path).scan("s").array, np.rint(scan.array))


def test_luna16_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetLayoutError, match="subset"):
        Luna16(tmp_path)
    writer = Luna16Writer(tmp_path)
    writer.add("x", ramp_volume(), [])
    writer.close()
    with pytest.raises(DatasetLayoutError, match="no scan nope.mhd"):
        Luna16(tmp_path).scan("nope")


def test_decathlon_msd_round_trip(tmp_path):
    labels = {1: "liver", 2: "spleen"}
    writer = DecathlonWriter(tmp_path, "demo", labels)
    label = ramp_volume().with_array(
        (np.arange(6 * 20 * 24) % 3).reshape(6, 20, 24).astype(np.uint8)
    )
    writer.add_training("c1", ramp_volume(), label)
    writer.add_test("c2", ramp_volume(), label)
    writer.add_test("c3", ramp_volume())
    writer.close()
    data = Decathlon(tmp_path)
    assert data.labels == labels and data.modality == "CT"
    assert [c.case_id for c in data.training] == ["c1"]
    assert [(c.case_id, c.label is not None) for c in data.test] == [("c2", True), ("c3", False)]
    back = data.label(data.training[0])
    assert back.array.dtype == np.uint8 and np.array_equal(back.array, label.array)
    import nibabel as nib

    stored = nib.load(str(data.training[0].image))
    assert stored.get_data_dtype() == np.int16  # CT images as int16 HU


def test_nnunet_v2_dialect(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "liver": 1},
                "numTraining": 1,
                "file_ending": ".nii.gz",
            }
        )
    )
    write_nifti(ramp_volume(), tmp_path / "imagesTr" / "case_001_0000.nii.gz")
    write_nifti(ramp_volume(), tmp_path / "labelsTr" / "case_001.nii.gz")
    data = Decathlon(tmp_path)
    assert data.labels == {1: "liver"}
    assert [c.case_id for c in data.training] == ["case_001"]


def test_decathlon_missing_file_is_named(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "x"},
                "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
            }
        )
    )
    with pytest.raises(DatasetLayoutError, match="imagesTr/a.nii.gz"):
        Decathlon(tmp_path)


def test_dicom_tree_from_directory_or_index(tmp_path):
    write_dicom_series(ramp_volume(), tmp_path / "tree" / "p" / "s")
    tree = DicomTree(tmp_path / "tree")
    table = write_index(index_tree(tmp_path / "tree"), tmp_path / "index.csv")
    again = DicomTree(table)
    assert [s.series_uid for s in again.series] == [s.series_uid for s in tree.series]
    assert np.array_equal(again.volume(again.series[0]).array, ramp_volume().array)


def test_split_is_reproducible_and_order_free(tmp_path):
    ids = [f"case{i:03d}" for i in range(50)]
    a = make_split(ids, n_labeled=10, seed=7, n_validation=5)
    b = make_split(list(reversed(ids)), n_labeled=10, seed=7, n_validation=5)
    assert a == b
    assert len(a.labeled) == 10 and len(a.validation) == 5 and len(a.unlabeled) == 35
    assert not set(a.labeled) & set(a.unlabeled) and not set(a.labeled) & set(a.validation)
    assert make_split(ids, 10, seed=8).labeled != make_split(ids, 10, seed=7).labeled
    assert read_split(write_split(a, tmp_path / "split.json")) == a
    with pytest.raises(MedsslError, match="cannot take 60"):
        make_split(ids, 60, seed=0)
