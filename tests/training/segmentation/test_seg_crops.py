"""Training crops of the segmentation trainers: nnU-Net-style foreground oversampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.training.networks.vnet import VNet, VNetConfig
from medssl.training.segmentation.data import LabeledVolume, SegCrops


class _Array:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array


def _volume(shape=(16, 64, 64)) -> LabeledVolume:
    """A big class 1 and a 2x2x2 class 2 in one corner; the rest background."""
    label = np.zeros(shape, np.uint8)
    label[:, 20:60, 20:60] = 1
    label[1:3, 2:4, 2:4] = 2
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    return LabeledVolume(_Array(image), _Array(label))


def _hits(crops: SegCrops, n: int = 300) -> np.ndarray:
    """Share of the first ``n`` crops that hold each class 0, 1, 2."""
    seen = np.zeros(3)
    for i in range(n):
        label = crops[i]["label"].numpy()
        seen += [(label == k).any() for k in range(3)]
    return seen / n


def test_foreground_crops_find_a_tiny_class_that_random_crops_almost_never_see():
    lookup = np.arange(256, dtype=np.uint8)
    random = SegCrops([_volume()], (8, 16, 16), lookup, None, -1.0, seed=0, stream=1)
    oversampled = SegCrops(
        [_volume()], (8, 16, 16), lookup, None, -1.0, seed=0, stream=1, foreground=1.0
    )
    assert _hits(random)[2] < 0.05  # 8 voxels in 65536: about 1 crop in 40 touches them
    tiny = _hits(oversampled)[2]
    assert 0.4 < tiny <= 1.0  # the class is drawn first: half the crops are centred on it


def test_a_third_of_the_crops_are_centred_on_foreground():
    lookup = np.arange(256, dtype=np.uint8)
    third = SegCrops(
        [_volume()], (8, 16, 16), lookup, None, -1.0, seed=0, stream=1, foreground=1 / 3
    )
    share = _hits(third, 600)[2]
    assert 1 / 6 - 0.06 < share < 1 / 6 + 0.08  # a third of crops, half of those on class 2


def test_without_oversampling_the_crop_stream_is_unchanged():
    """``foreground=0`` draws nothing extra: existing runs keep their crops."""
    lookup = np.arange(256, dtype=np.uint8)
    crops = SegCrops([_volume()], (8, 16, 16), lookup, None, -1.0, seed=3, stream=1)
    for i in range(5):
        draw = np.random.default_rng([3, 1, i])
        draw.integers(1)
        start = [int(draw.integers(0, n - p + 1)) for n, p in zip((16, 64, 64), (8, 16, 16))]
        window = _volume().label.array[
            start[0] : start[0] + 8, start[1] : start[1] + 16, start[2] : start[2] + 16
        ]
        np.testing.assert_array_equal(crops[i]["label"].numpy(), window)


def test_classes_follow_the_lookup_and_unmapped_codes_are_not_foreground():
    lookup = np.zeros(256, np.uint8)
    lookup[2] = 1  # only the tiny structure is a model class
    crops = SegCrops([_volume()], (8, 16, 16), lookup, None, -1.0, seed=0, stream=1, foreground=1.0)
    assert set(crops.class_locations(0)) == {1}
    assert len(crops.class_locations(0)[1]) == 8
    assert all((crops[i]["label"].numpy() == 1).any() for i in range(20))


def test_foreground_oversampling_needs_labels_and_a_share_in_0_1():
    lookup = np.arange(256, dtype=np.uint8)
    unlabeled = LabeledVolume(_volume().image, None)
    with pytest.raises(ValueError, match="labeled"):
        SegCrops([unlabeled], (8, 16, 16), lookup, None, -1.0, seed=0, stream=2, foreground=0.33)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SegCrops([_volume()], (8, 16, 16), lookup, None, -1.0, seed=0, stream=1, foreground=1.5)


def test_stage_dropout_zero_makes_the_train_mode_forward_deterministic():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 32, 32)
    quiet = VNet(VNetConfig(width=4, dropout=False, stage_dropout=0.0), 3).train()
    torch.testing.assert_close(quiet(x), quiet(x))
    noisy = VNet(VNetConfig(width=4, dropout=False), 3).train()  # official 0.1 after every conv
    assert not torch.equal(noisy(x), noisy(x))
    assert set(quiet.state_dict()) == set(noisy.state_dict())  # checkpoints stay interchangeable
    with pytest.raises(ValueError, match="stage_dropout"):
        VNetConfig(stage_dropout=1.0)
