"""Issue 18 item 5: target guessing leaves BatchNorm alone, one loss normaliser for the
joint batch, BatchNorm statistics re-estimated on inference windows."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn

from medssl.config import config_from_dict
from medssl.detection import CUBE_GROUP, AnchorGrid, AnchorSpec
from medssl.pipeline.windows import extract_window, plan_windows
from medssl.training.batchnorm import batch_statistics_only, inference_windows, reestimate_batchnorm
from medssl.training.detection.config import DetectionExperiment
from medssl.training.detection.focalmix import guess_targets
from medssl.training.detection.losses import FocalConfig
from medssl.training.methods.focalmix import focalmix_step, joint_loss
from medssl.training.networks.detector import CPU_SMALL, FPNDetector

SPEC = AnchorSpec()
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{b}": getattr(m, b).clone()
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in BN_BUFFERS
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} changed"


def test_target_guessing_leaves_batchnorm_running_statistics_alone():
    torch.manual_seed(0)
    net = FPNDetector(CPU_SMALL, SPEC).train()
    before = bn_buffers(net)
    guess_targets(net, torch.randn(2, 1, 32, 32, 32), [CUBE_GROUP[i] for i in (0, 7, 30)], 0.7)
    assert_same(before, bn_buffers(net))
    assert net.training  # guessing ran in train mode (batch statistics), as MixMatch guesses


def test_focalmix_step_guessing_does_not_move_the_guessing_networks_statistics():
    """``raw_model`` (the network the guesses run on) is a copy here, so only guessing touches
    it: its statistics must not move, while the trained network's do (its training pass)."""
    torch.manual_seed(0)
    cfg = config_from_dict(
        DetectionExperiment,
        {
            "model": {
                "widths": [8, 16, 24, 32],
                "blocks": [1, 2, 3, 2],
                "stem_width": 8,
                "fpn_width": 16,
                "head_width": 16,
            },
            "data": {"patch": 32},
            "focalmix": {"k": 2},
            "optim": {"steps": 10},
        },
    )
    net = FPNDetector(cfg.model, cfg.anchors).train()
    guesser = copy.deepcopy(net)
    grid = AnchorGrid.build(cfg.anchors, (32, 32, 32))
    n = grid.n_anchors
    labels = torch.zeros(2, n)
    labels[:, :3] = 1
    batch = {
        "image": torch.randn(2, 1, 32, 32, 32),
        "labels": labels,
        "deltas": torch.zeros(2, n, 4),
        "boxes": torch.zeros(2, 16, 4),
        "n_boxes": torch.zeros(2, dtype=torch.int64),
    }
    before_guesser, before_net = bn_buffers(guesser), bn_buffers(net)
    focalmix_step(
        net,
        guesser,
        batch,
        {"image": torch.randn(2, 1, 32, 32, 32)},
        grid,
        5,
        cfg,
        np.random.default_rng(0),
    )
    assert_same(before_guesser, bn_buffers(guesser))
    assert not torch.equal(
        before_net[next(iter(before_net))], bn_buffers(net)[next(iter(before_net))]
    )


def test_batch_statistics_only_restores_after_an_exception():
    bn = nn.BatchNorm1d(3).train()
    with pytest.raises(RuntimeError), batch_statistics_only(bn):
        bn(torch.randn(4, 3) + 5)
        raise RuntimeError("boom")
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0


def test_joint_batch_has_one_normaliser_for_labeled_and_unlabeled_anchors():
    """An unlabeled anchor with the same logit and target as a labeled one gets ``weight`` times
    its gradient, whatever the number of positives in either half; before, the unlabeled half
    was divided by its own positive count (usually max(1, 0) = 1)."""
    n = 50
    config = FocalConfig()
    grads = []
    for unlabeled_positives in (0, 1, 6):
        outputs = torch.zeros(4, n, 5)
        outputs[..., 0] = torch.linspace(-3, 3, n)
        outputs.requires_grad_(True)
        labeled = torch.zeros(2, n)
        labeled[0, :4] = 1.0
        labeled[1, 10] = -1.0
        unlabeled = torch.zeros(2, n)
        unlabeled[1, n - unlabeled_positives :] = 0.9
        losses = joint_loss(
            outputs, labeled, torch.zeros(2, n, 4), labeled == 1, unlabeled, 0.5, config
        )
        losses["loss"].backward()
        g = outputs.grad[..., 0]
        # anchor 20 of labeled row 0 and of unlabeled row 0: same logit, target 0
        assert g[2, 20].item() == pytest.approx(0.5 * g[0, 20].item(), rel=1e-6)
        assert losses["normaliser"].item() == 4 + unlabeled_positives
        grads.append(g[0, 20].item() * losses["normaliser"].item())
    # the per-anchor gradient times the joint count is the same in every case
    assert grads == pytest.approx([grads[0]] * 3, rel=1e-6)


def test_inference_windows_are_a_fixed_choice_of_the_pipelines_sliding_windows():
    shapes = [(40, 64, 64), (30, 50, 70)]
    every = [
        (i, s) for i, shape in enumerate(shapes) for s in plan_windows(shape, (32, 32, 32), 0.25)
    ]
    chosen = inference_windows(shapes, window=32, overlap=0.25, count=7, seed=3)
    assert len(chosen) == 7 and set(chosen) <= set(every) and chosen == sorted(chosen)
    assert chosen == inference_windows(shapes, window=32, overlap=0.25, count=7, seed=3)
    assert inference_windows(shapes, window=32, overlap=0.25, count=1000, seed=3) == every
    only_second = inference_windows(
        shapes, window=32, overlap=0.25, count=5, seed=3, keep=lambda i, s: i == 1
    )
    assert {i for i, _ in only_second} == {1}
    with pytest.raises(ValueError, match="count"):
        inference_windows(shapes, window=32, overlap=0.25, count=0, seed=3)


def test_reestimated_statistics_are_the_mean_and_variance_of_the_windows_activations():
    """Conv (weight 2, bias 1) then BatchNorm: after re-estimation its running mean is the mean of
    ``2 x + 1`` over the chosen windows (two full batches: the mean of the batch means), its
    running variance the mean of the two batches' unbiased variances."""
    rng = np.random.default_rng(0)
    arrays = [
        rng.normal(size=(12, 12, 12)).astype(np.float32),
        rng.normal(3.0, 2.0, size=(12, 12, 12)).astype(np.float32),
    ]
    conv = nn.Conv3d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        conv.bias.fill_(1.0)
    net = nn.Sequential(conv, nn.BatchNorm3d(1, momentum=0.3)).eval()
    net[1].running_mean.fill_(-7.0)
    windows = inference_windows([a.shape for a in arrays], window=8, overlap=0.5, count=8, seed=0)
    used = reestimate_batchnorm(net, arrays, windows, window=8, pad_value=-1.0, batch_size=4)
    assert used == 8
    patches = np.stack([extract_window(arrays[i], s, (8, 8, 8), -1.0) for i, s in windows]) * 2 + 1
    assert net[1].running_mean.item() == pytest.approx(patches.mean(), rel=1e-5)
    variance = np.mean([patches[:4].var(ddof=1), patches[4:].var(ddof=1)])
    assert net[1].running_var.item() == pytest.approx(variance, rel=1e-5)
    assert not net.training and net[1].momentum == 0.3  # mode and momentum restored


def test_batch_statistics_only_keeps_a_graph_built_inside_it_differentiable():
    """PatchCL embeds with gradients inside the block: backward after it must still work (the
    statistics are swapped back, not written into tensors batch norm saved for backward)."""
    net = nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3)).train()
    before = bn_buffers(net)
    with batch_statistics_only(net):
        out = net(torch.randn(4, 2, 5))
    out.square().sum().backward()
    assert net[0].weight.grad is not None
    assert_same(before, bn_buffers(net))
