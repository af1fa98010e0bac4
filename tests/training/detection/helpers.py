"""Helpers shared by the detection-training tests (plain functions; fixtures are in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medssl.cli.train import resolve_config
from medssl.config import load_config, parse_overrides
from medssl.training.detection.config import DetectionExperiment

# A few steps of the CPU-sized network on 32^3 patches: enough to exercise the machinery
# (splits, cache, checkpoints, resume, logs, report), not to learn anything.
TINY = [
    "optim.steps=4",
    "eval.every=2",
    "eval.bootstrap=10",
    "data.patch=32",
    "data.n_validation=1",
    "data.test_subsets=[9]",
    "data.workers=0",
]


def tiny_config(method: str, *extra: str) -> DetectionExperiment:
    """The `focalmix-cpu` config with TINY and `extra` overrides, for `method`."""
    return load_config(
        DetectionExperiment,
        resolve_config("focalmix-cpu"),
        {**parse_overrides([*TINY, *extra]), "method": method},
    )


def checkpoint(run: Path) -> dict:
    """The last checkpoint of a training run folder."""
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)


def noise_scans(n: int = 2, shape: tuple[int, int, int] = (40, 64, 64)) -> list:
    """`n` cached noise volumes of `shape` (z, y, x), each with one 6 mm box at (20, 30, 30)."""
    from medssl.training.cache import CachedVolume
    from medssl.training.detection.data import ScanBoxes

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        volume = CachedVolume(rng.normal(size=shape).astype(np.float32), np.eye(4), f"s{i}")
        out.append(ScanBoxes(volume, np.array([[20.0, 30.0, 30.0, 6.0]], dtype=np.float32)))
    return out
