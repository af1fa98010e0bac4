"""The layouts the SSL literature ships: UA-MT's LA h5 folders and A&D's npy + split_txts."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from medssl.datasets.ad_npy import ADNumpy, write_ad_npy
from medssl.datasets.la_h5 import LA_SPACING_MM, LAHeart, write_la_h5
from medssl.errors import DatasetLayoutError


def case_arrays(shape=(5, 7, 9), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A ``(z, y, x)`` image whose every voxel differs (to catch transposes) and a label."""
    image = np.random.default_rng(seed).random(shape).astype(np.float32)
    label = (image > 0.5).astype(np.uint8)
    return image, label


# -- LA h5 ------------------------------------------------------------------------


@pytest.fixture
def la_root(tmp_path):
    cases = {name: case_arrays(seed=i) for i, name in enumerate(["CASEA", "CASEB", "CASEC"])}
    write_la_h5(tmp_path, cases, test=["CASEB"])
    return tmp_path, cases


def test_la_h5_round_trip_returns_zyx_arrays_at_0625_mm(la_root):
    root, cases = la_root
    dataset = LAHeart(root)
    image, label = dataset.image("CASEA"), dataset.label("CASEA")
    assert np.array_equal(image.array, cases["CASEA"][0]) and image.array.dtype == np.float32
    assert np.array_equal(label.array, cases["CASEA"][1]) and label.array.dtype == np.uint8
    assert np.allclose(image.spacing, [LA_SPACING_MM] * 3)
    assert LA_SPACING_MM == 0.625
    assert image.meta["case"] == "CASEA"


def test_la_h5_stores_x_y_z_as_ua_mt_reads_it(la_root):
    root, cases = la_root
    with h5py.File(root / "CASEC" / "mri_norm2.h5", "r") as h5:
        stored = h5["image"][:]
    assert stored.shape == (9, 7, 5)  # (x, y, z) of a (5, 7, 9) (z, y, x) array
    assert stored[8, 1, 4] == cases["CASEC"][0][4, 1, 8]


def test_la_h5_standard_split_comes_from_the_list_files(la_root):
    root, _ = la_root
    dataset = LAHeart(root)
    assert dataset.train_cases == ["CASEA", "CASEC"]
    assert dataset.test_cases == ["CASEB"]


def test_la_h5_finds_lists_one_level_up_as_ua_mt_keeps_them(tmp_path):
    data = tmp_path / "data"
    write_la_h5(data, {"CASEA": case_arrays()}, test=[])
    images = data / "2018LA_Seg_Training Set"
    images.mkdir()
    (data / "CASEA").rename(images / "CASEA")
    dataset = LAHeart(images)
    assert dataset.list_dir == data
    assert dataset.train_cases == ["CASEA"] and dataset.test_cases == []
    assert dataset.image("CASEA").shape == (5, 7, 9)


def test_la_h5_reads_lists_from_list_dir(tmp_path):
    write_la_h5(tmp_path / "h5", {"CASEA": case_arrays()}, test=["CASEA"])
    lists = tmp_path / "lists"
    lists.mkdir()
    for name in ("train.list", "test.list"):
        (tmp_path / "h5" / name).rename(lists / name)
    assert LAHeart(tmp_path / "h5", list_dir=lists).test_cases == ["CASEA"]


def test_la_h5_without_lists_says_where_they_are_expected(tmp_path):
    (tmp_path / "sets" / "CASEA").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="train.list and test.list not found in") as err:
        LAHeart(tmp_path / "sets")
    assert f"in {tmp_path / 'sets'} or {tmp_path};" in str(err.value)


def test_la_h5_missing_case_file_names_the_path(la_root):
    root, _ = la_root
    with pytest.raises(DatasetLayoutError, match=r"NOPE/mri_norm2\.h5: missing"):
        LAHeart(root).image("NOPE")


def test_la_h5_missing_dataset_key_is_named(la_root):
    root, _ = la_root
    with h5py.File(root / "CASEA" / "mri_norm2.h5", "a") as h5:
        del h5["label"]
    with pytest.raises(DatasetLayoutError, match="has no 'label' dataset"):
        LAHeart(root).label("CASEA")


def test_la_h5_case_in_both_lists_is_rejected(la_root):
    root, _ = la_root
    (root / "test.list").write_text("CASEB\nCASEA\n")
    with pytest.raises(DatasetLayoutError, match="share 1 case"):
        LAHeart(root)


def test_la_h5_root_that_is_not_a_folder_is_rejected(tmp_path):
    with pytest.raises(DatasetLayoutError, match="not a folder"):
        LAHeart(tmp_path / "absent")


# -- A&D npy ----------------------------------------------------------------------


@pytest.fixture
def ad_root(tmp_path):
    cases = {f"{i:04d}": case_arrays(seed=i) for i in (7, 1, 3)}
    splits = {"labeled_0.2": ["0007"], "unlabeled_0.2": ["0003", "0001"], "test": ["0001"]}
    write_ad_npy(tmp_path, cases, splits)
    return tmp_path, cases


def test_ad_npy_round_trip_zyx(ad_root):
    root, cases = ad_root
    dataset = ADNumpy(root, spacing=(2.0, 0.5, 0.5))
    image, label = dataset.image("0007"), dataset.label("0007")
    assert np.array_equal(image.array, cases["0007"][0])
    assert np.array_equal(label.array, cases["0007"][1]) and label.array.dtype == np.uint8
    assert np.allclose(image.spacing, [2.0, 0.5, 0.5])
    assert image.meta["id"] == "0007"


def test_ad_npy_default_spacing_is_one_mm(ad_root):
    root, _ = ad_root
    assert np.allclose(ADNumpy(root).image("0001").spacing, [1.0, 1.0, 1.0])


def test_ad_npy_xyz_order_is_transposed_on_write_and_read(tmp_path):
    image, label = case_arrays()
    write_ad_npy(tmp_path, {"LA01": (image, label)}, {"train": ["LA01"]}, axis_order="xyz")
    stored = np.load(tmp_path / "npy" / "LA01_image.npy")
    assert stored.shape == (9, 7, 5) and stored[8, 1, 4] == image[4, 1, 8]
    dataset = ADNumpy(tmp_path, axis_order="xyz")
    assert np.array_equal(dataset.image("LA01").array, image)
    assert np.array_equal(dataset.label("LA01").array, label)


def test_ad_npy_synapse_style_float_labels_become_int16(tmp_path):
    image, label = case_arrays()
    write_ad_npy(tmp_path, {"0001": (image, label.astype(np.float32) * 13)}, {"test": ["0001"]})
    read = ADNumpy(tmp_path).label("0001")
    assert read.array.dtype == np.int16
    assert np.array_equal(read.array, label.astype(np.int16) * 13)


def test_ad_npy_fractional_labels_are_rejected(tmp_path):
    image, _ = case_arrays()
    write_ad_npy(tmp_path, {"0001": (image, image)}, {"test": ["0001"]})
    with pytest.raises(DatasetLayoutError, match="not whole numbers"):
        ADNumpy(tmp_path).label("0001")


def test_ad_npy_splits_and_ids_sorted_like_read_list(ad_root):
    root, _ = ad_root
    dataset = ADNumpy(root)
    assert dataset.splits() == ["labeled_0.2", "test", "unlabeled_0.2"]
    assert dataset.ids("unlabeled_0.2") == ["0001", "0003"]
    assert dataset.ids("labeled_0.2") == ["0007"]


def test_ad_npy_unknown_split_lists_the_known_ones(ad_root):
    root, _ = ad_root
    with pytest.raises(DatasetLayoutError, match=r"no split 'labeled_20p'.*labeled_0\.2, test"):
        ADNumpy(root).ids("labeled_20p")


def test_ad_npy_missing_array_names_the_path(ad_root):
    root, _ = ad_root
    (root / "npy" / "0003_label.npy").unlink()
    with pytest.raises(DatasetLayoutError, match=r"0003_label\.npy: missing"):
        ADNumpy(root).label("0003")


def test_ad_npy_folder_without_the_layout_is_rejected(tmp_path):
    with pytest.raises(DatasetLayoutError, match="npy: missing; expected A&D"):
        ADNumpy(tmp_path)


def test_ad_npy_unknown_axis_order_is_rejected(ad_root):
    root, _ = ad_root
    with pytest.raises(ValueError, match="'yxz'"):
        ADNumpy(root, axis_order="yxz")  # type: ignore[arg-type]


def test_writers_reject_ids_missing_from_cases(tmp_path):
    with pytest.raises(ValueError, match="'0009'"):
        write_ad_npy(tmp_path, {"0001": case_arrays()}, {"test": ["0009"]})
    with pytest.raises(ValueError, match="'CASEZ'"):
        write_la_h5(tmp_path, {"CASEA": case_arrays()}, test=["CASEZ"])
