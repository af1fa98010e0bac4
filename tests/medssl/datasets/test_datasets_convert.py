"""LA h5 and A&D npy datasets converted to the Decathlon layout medssl-train reads."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from medssl.cli.main import cli
from medssl.datasets.ad_npy import write_ad_npy
from medssl.datasets.decathlon import Decathlon
from medssl.datasets.la_h5 import LA_SPACING_MM, write_la_h5


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(8, 12, 10)).astype(np.float32)
    label = np.zeros((8, 12, 10), dtype=np.uint8)
    label[2:6, 3:9, 2:7] = 1
    return image, label


def test_la_h5_converts_with_its_train_and_test_lists(tmp_path):
    cases = {f"case{i}": _case(i) for i in range(5)}
    write_la_h5(tmp_path / "la", cases, test=["case4"])
    result = CliRunner().invoke(
        cli, ["convert", "la-h5", str(tmp_path / "la"), str(tmp_path / "dec")]
    )
    assert result.exit_code == 0, result.output
    data = Decathlon(tmp_path / "dec")
    assert [c.case_id for c in data.training] == ["case0", "case1", "case2", "case3"]
    assert [c.case_id for c in data.test] == ["case4"]
    label = data.label(data.test[0])
    assert np.array_equal(label.array, cases["case4"][1])
    assert np.allclose(data.image(data.training[0]).spacing, LA_SPACING_MM)
    assert data.labels == {1: "left_atrium"}


def test_ad_npy_test_split_becomes_imagests_and_the_rest_training(tmp_path):
    cases = {f"s{i}": _case(10 + i) for i in range(4)}
    write_ad_npy(
        tmp_path / "npy",
        cases,
        {"labeled_0.2": ["s0"], "unlabeled_0.2": ["s1", "s2"], "test": ["s3"]},
    )
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            "ad-npy",
            str(tmp_path / "npy"),
            str(tmp_path / "dec"),
            "--label",
            "1=spleen",
            "--spacing",
            "3",
            "1",
            "1",
            "--modality",
            "MR",
        ],
    )
    assert result.exit_code == 0, result.output
    data = Decathlon(tmp_path / "dec")
    assert [c.case_id for c in data.training] == ["s0", "s1", "s2"]
    assert [c.case_id for c in data.test] == ["s3"]
    assert np.allclose(data.image(data.training[1]).array, cases["s1"][0], atol=1e-5)
    assert np.allclose(data.image(data.training[0]).spacing, (3, 1, 1))


def test_ad_npy_label_option_must_be_code_equals_name(tmp_path):
    write_ad_npy(tmp_path / "npy", {"s0": _case(0)}, {"test": ["s0"]})
    result = CliRunner().invoke(
        cli,
        ["convert", "ad-npy", str(tmp_path / "npy"), str(tmp_path / "dec"), "--label", "spleen"],
    )
    assert result.exit_code != 0
    assert "CODE=NAME" in result.output
