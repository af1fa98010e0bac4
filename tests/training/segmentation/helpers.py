"""Helpers shared by the segmentation-training tests (plain functions; fixtures are in
conftest.py)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from medssl.cli.train import resolve_config
from medssl.config import load_config, parse_overrides
from medssl.training.segmentation.config import SegmentationExperiment
from medssl.training.segmentation.trainer import train_segmenter

# A few steps of a width-4 network on 16^3 crops: the machinery, not learning.
TINY = [
    "optim.steps=4",
    "eval.every=2",
    "data.patch=[16,16,16]",
    "data.workers=0",
    "model.width=4",
    "data.n_validation=1",
]


def tiny_config(method: str, *overrides: str) -> SegmentationExperiment:
    """The `seg-ssl-cpu` config with TINY and `overrides`, for `method`."""
    return load_config(
        SegmentationExperiment,
        resolve_config("seg-ssl-cpu"),
        {**parse_overrides([*TINY, *overrides]), "method": method},
    )


def logged(run: Path) -> list[dict]:
    """The records of a run's log.jsonl, in order."""
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def checkpoint(run: Path, name: str = "last.pt") -> dict:
    """A checkpoint of a training run folder (`last.pt` by default)."""
    return torch.load(run / "checkpoints" / name, weights_only=False)


#: The module of ``medssl.training.methods`` that defines each step function.
STEP_MODULES = {
    "ad_step": "ad",
    "mean_teacher_step": "mean_teacher",
    "fixmatch_step": "fixmatch",
    "patchcl_step": "patchcl",
    "bcp_self_train_step": "bcp",
    "supervised_seg_step": "supervised_seg",
}


def weights(state: dict, part: str) -> dict:
    """A checkpoint's ``model`` weights, or the method's network ``part`` (``teacher``)."""
    return state["model"] if part == "model" else state["method"][part]


def train_interrupted_then_resumed(
    cfg, data, out, monkeypatch, step_name: str, at_call: int = 3
) -> None:
    """Train ``cfg`` into ``out``, interrupted by a KeyboardInterrupt at the ``at_call``-th call of
    ``<step_name>`` in its method's module (``medssl.training.methods.<module>``), then resume it
    to the end (the straight-vs-resumed tests)."""
    module = importlib.import_module(f"medssl.training.methods.{STEP_MODULES[step_name]}")
    real_step, calls = getattr(module, step_name), {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(module, step_name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_segmenter(cfg, data, out, device="cpu")
    assert json.loads((out / "checkpoints" / "index.json").read_text())["last_step"] == at_call - 1
    monkeypatch.setattr(module, step_name, real_step)
    train_segmenter(cfg, data, out, resume=True, device="cpu")
