"""Issue 18 item 5, in the detector trainer: the checkpoints carry BatchNorm statistics
re-estimated on inference windows of the labeled scans; one split for every seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch import nn

from medssl.pipeline import Intensity
from medssl.training import det_trainer
from medssl.training.batchnorm import inference_windows, reestimate_batchnorm
from medssl.training.det_scans import split_luna16
from medssl.training.det_trainer import train_detector
from medssl.training.detector import FPNDetector
from tests.test_train_detector import cache, luna, tiny_config  # noqa: F401 (fixtures)

SHORT = ("optim.steps=2", "eval.every=2", "data.test_subsets=[]")


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)


def is_statistic(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def test_checkpoints_carry_batchnorm_statistics_of_the_labeled_scans_inference_windows(luna, tmp_path):  # noqa: F811
    """Same seed with and without re-estimation: the same weights (running statistics never
    shape training), and the re-estimating run's statistics are exactly those that
    :func:`reestimate_batchnorm` gives the plain run's weights on the chosen windows."""
    plain = train_detector(tiny_config("supervised-det", *SHORT, "eval.bn_windows=0"), luna, tmp_path / "plain",
                           n_labeled=4, device="cpu")
    cfg = tiny_config("supervised-det", *SHORT, "eval.bn_windows=8")
    train_detector(cfg, luna, tmp_path / "bn", n_labeled=4, device="cpu")
    a, b = checkpoint(plain.out)["model"], checkpoint(tmp_path / "bn")["model"]
    for name in a:
        if not is_statistic(name):
            torch.testing.assert_close(b[name], a[name], msg=f"{name} differs")
    assert any(not torch.equal(a[n], b[n]) for n in a if n.endswith("running_mean"))

    split = json.loads((tmp_path / "bn" / "split.json").read_text())
    cache_ = det_trainer._cache(cfg)
    pool = split_luna16(luna, 4, 0, cfg.data.test_subsets, cfg.data.n_validation, cfg.data.split_seed)
    arrays = [cache_.get(u, pool.source(u).load).array for u in split["labeled"]]
    windows = inference_windows([x.shape for x in arrays], window=cfg.window, overlap=cfg.eval.overlap,
                                count=8, seed=cfg.seed)
    net = FPNDetector(cfg.model, cfg.anchors)
    net.load_state_dict(a)
    pad = Intensity(cfg.data.hu_min, cfg.data.hu_max).pad_value
    reestimate_batchnorm(net, arrays, windows, window=cfg.window, pad_value=pad, batch_size=cfg.optim.batch_size)
    expected = net.state_dict()
    for name in a:
        if is_statistic(name):
            torch.testing.assert_close(b[name], expected[name], msg=f"{name} is not the re-estimated statistic")
    assert any(isinstance(m, nn.BatchNorm3d) for m in net.modules())


def test_every_seed_trains_on_the_same_split(luna, tmp_path):  # noqa: F811
    """``data.split_seed`` is a constant (default 0), not the training seed: seeds change the
    training noise only (issue 18 item 5)."""
    for seed in (0, 3):
        train_detector(tiny_config("supervised-det", "optim.steps=1", "eval.every=1", "data.test_subsets=[]",
                                   "eval.bn_windows=0", f"seed={seed}"), luna, tmp_path / f"s{seed}",
                       n_labeled=4, device="cpu")
    splits = [json.loads((tmp_path / f"s{seed}" / "split.json").read_text()) for seed in (0, 3)]
    assert splits[0] == splits[1]
    assert tiny_config("supervised-det", "seed=5").data.split_seed == 0
