"""Fixtures of the segmentation-training tests: a tiny organ dataset and a private cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from medssl.synth.datasets import write_organ_dataset


@pytest.fixture(scope="module")
def organs(tmp_path_factory) -> Path:
    """Domain A of the synthetic organ data: 5 cases (1 test) of 32x48x48 voxels."""
    root = tmp_path_factory.mktemp("fm-organs")
    write_organ_dataset(root / "A", cases=5, n_test=1, domain="A", seed=0, shape=(32, 48, 48))
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """Every test caches preprocessed volumes under the session's temporary folder."""
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path_factory.getbasetemp() / "fm-cache"))
