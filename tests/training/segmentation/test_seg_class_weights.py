"""Class-weighted CE for imbalanced organs (``loss.class_weighting: frequency``)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from medssl.training.segmentation import losses as seg_losses
from medssl.training.segmentation.losses import dice_ce_loss, frequency_weights, soft_dice
from medssl.training.segmentation.trainer import train_segmenter
from tests.training.segmentation.helpers import checkpoint, tiny_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_frequency_weights_are_the_damped_inverse_frequency_with_background_at_one():
    w = frequency_weights([1_000_000, 10_000, 100], power=0.25)
    assert w.tolist() == pytest.approx([1.0, 100**0.25, 10_000**0.25])
    absent = frequency_weights([1000, 10, 0], power=0.5)
    assert absent.tolist() == pytest.approx(
        [1.0, 10.0, 10.0]
    )  # a class not seen: the largest weight
    assert frequency_weights([5, 5], power=0.0).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="background"):
        frequency_weights([0, 5])


def test_ce_weights_weigh_only_the_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 4, 4, 4), torch.randint(0, 3, (2, 4, 4, 4))
    w = torch.tensor([1.0, 2.0, 5.0])
    expected = F.cross_entropy(logits, target, weight=w) + 1 - soft_dice(logits, target)[1:].mean()
    torch.testing.assert_close(dice_ce_loss(logits, target, ce_weights=w), expected)
    assert not torch.allclose(
        dice_ce_loss(logits, target, ce_weights=w), dice_ce_loss(logits, target)
    )
    with pytest.raises(ValueError, match="ce_weights"):
        dice_ce_loss(logits, target, ce_weights=torch.ones(2))


@pytest.mark.parametrize("method", ["supervised-seg", "mean-teacher"])
def test_the_trainer_weighs_every_methods_labeled_loss_from_the_labeled_voxel_counts(
    method, organs, tmp_path, monkeypatch
):
    seen = []
    original = seg_losses.dice_ce_loss

    def spy(logits, target, class_weights=None, ce_weights=None):
        seen.append(ce_weights)
        return original(logits, target, class_weights, ce_weights)

    monkeypatch.setattr(seg_losses, "dice_ce_loss", spy)
    cfg = tiny_config(method, "loss.class_weighting=frequency")
    run = train_segmenter(cfg, organs, tmp_path / "w", device="cpu")
    weights = checkpoint(run.out)["provenance"]["ce_weights"]
    assert (
        len(weights) == 2 and weights[0] == 1.0 and weights[1] > 1.0
    )  # the liver is rarer than background
    assert seen and all(
        w is not None and w.tolist() == pytest.approx(weights, abs=1e-4) for w in seen
    )
    seen.clear()
    train_segmenter(
        tiny_config(method, "loss.class_weighting=none"), organs, tmp_path / "plain", device="cpu"
    )
    assert seen and all(w is None for w in seen)
