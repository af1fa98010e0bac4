"""Fixtures of the detection-training tests: a tiny synthetic LUNA16 folder and a private cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from medssl.synth.datasets import write_chest_dataset


@pytest.fixture(scope="module")
def luna(tmp_path_factory) -> Path:
    """10 annotated scans (subset i % 10) and 2 unlabeled, 64x64x40 voxels."""
    root = tmp_path_factory.mktemp("luna")
    write_chest_dataset(root, cases=10, unlabeled=2, matrix=64, n_slices=40, seed=500)
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """Every test caches preprocessed volumes under the session's temporary folder."""
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path_factory.getbasetemp() / "medssl-cache"))
