"""Repository paths the tests read (the shipped model repository, benchmark assets)."""

from __future__ import annotations

from pathlib import Path

#: The repository root (the folder holding pyproject.toml).
ROOT = Path(__file__).resolve().parents[1]
#: The shipped Triton model repository.
MODEL_REPOSITORY = ROOT / "model_repository"
#: The shipped nodule detector's folder (config.pbtxt, medssl.json, 1/model.onnx).
DETECTOR_DIR = MODEL_REPOSITORY / "focalmix-nodules"
