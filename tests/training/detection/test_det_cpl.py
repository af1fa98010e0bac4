"""`focalmix` with CPL object selection (``focalmix.object_policy: flexmatch``) end to end on
a tiny synthetic LUNA16 folder: the memory fills, is checkpointed, and a resumed run continues
with it exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from medssl.cli.train import resolve_config
from medssl.config import load_config, parse_overrides
from medssl.errors import MedsslError
from medssl.training.detection.config import DetectionExperiment
from medssl.training.detection.trainer import train_detector
from medssl.training.loop import TrainingDivergedError
from medssl.training.methods import focalmix as focalmix_method
from tests.training.detection.helpers import TINY as DETECTOR_TINY

pytestmark = [pytest.mark.slow]

TINY = [*DETECTOR_TINY, "method=focalmix", "focalmix.k=2", "focalmix.object_policy=flexmatch"]


def last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)


def test_cpl_focalmix_checkpoints_its_memory_and_resumes_with_it(luna, tmp_path, monkeypatch):
    cfg = load_config(DetectionExperiment, resolve_config("focalmix-cpu"), parse_overrides(TINY))
    train_detector(cfg, luna, tmp_path / "straight", n_labeled=4, n_unlabeled=2, device="cpu")
    logged = [
        json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    ]
    steps = [r for r in logged if "unlabeled" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["cpl_threshold"] == 0.0  # t = 0: every CPL threshold is 0
    assert all(0 <= r["cpl_threshold"] <= 0.8 and r["objects"] >= 0 for r in steps)
    # 8 unlabeled crops of 32^3 per step write confident verdicts into many 8^3 cells
    assert steps[-1]["cpl_background_cells"] + steps[-1]["cpl_nodule_cells"] > 0
    state = last(tmp_path / "straight")["method"]["threshold"]
    assert state["policy"] == "flexmatch" and state["n_classes"] == 2 and state["tau"] == 0.8
    written = int((state["memory"] >= 0).sum())
    assert written == steps[-1]["cpl_background_cells"] + steps[-1]["cpl_nodule_cells"]

    real_step = focalmix_method.focalmix_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        losses = real_step(*args, **kwargs)
        if calls["n"] == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(focalmix_method, "focalmix_step", poisoned)
    with pytest.raises(TrainingDivergedError, match="step 2"):
        train_detector(cfg, luna, tmp_path / "broken", n_labeled=4, n_unlabeled=2, device="cpu")
    monkeypatch.setattr(focalmix_method, "focalmix_step", real_step)
    train_detector(
        cfg, luna, tmp_path / "broken", n_labeled=4, n_unlabeled=2, resume=True, device="cpu"
    )
    straight, resumed = last(tmp_path / "straight"), last(tmp_path / "broken")
    assert torch.equal(resumed["method"]["threshold"]["memory"], state["memory"])
    for name, value in straight["model"].items():
        torch.testing.assert_close(
            resumed["model"][name], value, msg=f"{name} differs after resume"
        )


def test_resuming_a_fixed_threshold_run_with_cpl_is_refused(luna, tmp_path):
    fixed = load_config(
        DetectionExperiment,
        resolve_config("focalmix-cpu"),
        parse_overrides([*TINY[:-1], "optim.steps=2", "focalmix.object_mixup=false"]),
    )
    train_detector(fixed, luna, tmp_path / "run", n_labeled=4, n_unlabeled=2, device="cpu")
    cpl = load_config(DetectionExperiment, resolve_config("focalmix-cpu"), parse_overrides(TINY))
    with pytest.raises(MedsslError, match="no CPL memory"):
        train_detector(
            cpl, luna, tmp_path / "run", n_labeled=4, n_unlabeled=2, resume=True, device="cpu"
        )
