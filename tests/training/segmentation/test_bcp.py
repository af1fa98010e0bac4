"""BCP's parts against hand-computed values: the box mask, the two mixes, the weighted mix loss,
the pseudo-labels and their largest components, the EMA teacher, the two phases and the configs.

References: DeepMed-Lab-ECNU/BCP ``code/LA_BCP_train.py``, ``code/LA&ACDC/utils/BCP_utils.py``
(``context_mask``, ``mix_loss``) and ``code/LA&ACDC/utils/losses.py`` (``mask_DiceLoss``).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn
from torch.nn import functional as F

from medssl.cli.train import resolve_config
from medssl.config import load_config, parse_overrides
from medssl.errors import ConfigError
from medssl.training.methods.base import ema_update
from medssl.training.methods.bcp import bcp_pretrain_step, bcp_self_train_step
from medssl.training.segmentation.bcp import (
    BCPPhases,
    Box,
    bidirectional_mix,
    box_mask,
    copy_paste,
    keep_largest_components,
    masked_dice_loss,
    mix_loss,
    pseudo_labels,
    sample_box,
)
from medssl.training.segmentation.config import BCPConfig, SegmentationExperiment

S = 1e-5  # mask_DiceLoss smoothing
BIG = 100.0  # logits of ±100: softmax is exactly one-hot in float32, CE exactly 0 or 200

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def experiment(*overrides: str) -> SegmentationExperiment:
    return load_config(
        SegmentationExperiment,
        resolve_config("seg-ssl-cpu"),
        {
            **parse_overrides(
                ["model.width=4", "optim.steps=10", "bcp.pretrain_steps=5", *overrides]
            ),
            "method": "bcp",
        },
    )


def confident(labels: torch.Tensor, n_classes: int = 2) -> torch.Tensor:
    """Logits ``(B, C, *spatial)`` of ±BIG, predicting ``labels (B, *spatial)``."""
    return (F.one_hot(labels, n_classes).movedim(-1, 1).float() * 2 - 1) * BIG


class ConstantNet(nn.Module):
    """Predicts class ``label`` everywhere with ±BIG logits and records its inputs."""

    def __init__(self, label: int, n_classes: int = 2) -> None:
        super().__init__()
        self.label, self.n_classes, self.inputs = label, n_classes, []
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        labels = torch.full((x.shape[0], *x.shape[2:]), self.label, dtype=torch.long)
        return confident(labels, self.n_classes) * self.scale


# ---------------------------------------------------------------- mask


def test_box_edges_are_two_thirds_of_the_patch_and_the_box_stays_inside():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        box = sample_box((80, 112, 112), 2 / 3, generator)
        assert box.size == (53, 74, 74)  # int(80·2/3), int(112·2/3)
        assert all(0 <= c <= p - s for c, s, p in zip(box.corner, box.size, (80, 112, 112)))


def test_every_position_where_the_box_fits_is_drawn():
    generator = torch.Generator().manual_seed(1)
    corners = {sample_box((3, 3, 6), 2 / 3, generator).corner for _ in range(400)}
    assert corners == {
        (z, y, x) for z in (0, 1) for y in (0, 1) for x in (0, 1, 2)
    }  # box (2, 2, 4)


def test_the_box_comes_from_the_generator_alone():
    draw = [
        sample_box((16, 48, 48), 2 / 3, torch.Generator().manual_seed(seed)) for seed in (5, 5, 6)
    ]
    assert draw[0] == draw[1] and draw[0] != draw[2]


def test_the_mask_is_false_exactly_in_the_box():
    mask = box_mask((4, 5, 6), Box((1, 2, 0), (2, 2, 4)))
    expected = np.ones((4, 5, 6), dtype=bool)
    for z in range(1, 3):
        for y in range(2, 4):
            for x in range(4):
                expected[z, y, x] = False
    assert mask.dtype == torch.bool
    np.testing.assert_array_equal(mask.numpy(), expected)
    assert int((~mask).sum()) == 2 * 2 * 4


def test_a_slice_wise_box_spans_the_depth_and_a_slice_is_too_thin_for_a_3d_box():
    box = sample_box((1, 48, 48), 2 / 3, torch.Generator().manual_seed(0), whole_depth=True)
    assert box.size == (1, 32, 32) and box.corner[0] == 0
    with pytest.raises(ValueError, match="too small"):
        sample_box((1, 48, 48), 2 / 3)
    with pytest.raises(ValueError, match="ratio"):
        sample_box((16, 16, 16), 1.0)


# ---------------------------------------------------------------- mixes


def test_the_two_mixes_take_every_voxel_from_the_intended_source():
    shape = (2, 1, 4, 5, 6)
    base = torch.arange(np.prod(shape), dtype=torch.float32).reshape(shape)
    labeled_a, labeled_b, unlabeled_a, unlabeled_b = (
        base + 1000 * k for k in range(4)
    )  # all values distinct
    mask = box_mask(shape[2:], Box((1, 1, 2), (2, 3, 3)))
    mix_in, mix_out = bidirectional_mix(labeled_a, labeled_b, unlabeled_a, unlabeled_b, mask)
    m = mask.expand(shape)
    # in = labeled outside the box, unlabeled inside; out = unlabeled outside, labeled inside
    assert torch.equal(mix_in == labeled_a, m) and torch.equal(mix_in == unlabeled_a, ~m)
    assert torch.equal(mix_out == unlabeled_b, m) and torch.equal(mix_out == labeled_b, ~m)
    # exact complements: every voxel position is labeled in exactly one of the two mixes
    assert torch.equal(
        (mix_in == labeled_a) ^ (mix_out == labeled_b), torch.ones(shape, dtype=torch.bool)
    )


def test_copy_paste_keeps_label_values_and_dtype():
    a, b = torch.zeros(1, 3, 3, 3, dtype=torch.long), torch.full((1, 3, 3, 3), 7)
    mixed = copy_paste(a, b, box_mask((3, 3, 3), Box((1, 1, 1), (2, 2, 2))))
    assert (
        mixed.dtype == torch.long and int((mixed == 7).sum()) == 8 and int((mixed == 0).sum()) == 19
    )
    with pytest.raises(ValueError, match="copy-paste"):
        copy_paste(a, b[:, :2], torch.ones(3, 3, 3, dtype=torch.bool))


# ---------------------------------------------------------------- losses


def test_mask_dice_is_per_sample_and_class_with_background_and_smooth_1e5():
    logits = torch.zeros(2, 2, 1, 1, 2)  # p = 0.5 everywhere
    target = torch.tensor([[0, 1], [1, 1]]).view(2, 1, 1, 2)
    dice = [
        (1 + S) / (2 + S),
        (1 + S) / (2 + S),  # sample 0: background, foreground
        S / (1 + S),
        (2 + S) / (3 + S),
    ]  # sample 1: no background voxel; 2 foreground
    torch.testing.assert_close(
        masked_dice_loss(logits, target), torch.tensor(1 - np.mean(dice), dtype=torch.float32)
    )
    first_voxel = torch.tensor([True, False]).view(1, 1, 2)
    dice = [
        (1 + S) / (1.5 + S),
        S / (0.5 + S),
        S / (0.5 + S),
        (1 + S) / (1.5 + S),
    ]  # one voxel, p = 0.5
    torch.testing.assert_close(
        masked_dice_loss(logits, target, first_voxel),
        torch.tensor(1 - np.mean(dice), dtype=torch.float32),
    )


def _mirrored_case(gt_right: bool, pseudo_right: bool):
    """Two halves of a 2x4 slice mirrored onto each other: ground truth on the left (mask True),
    pseudo-labels on the right; the prediction is right or wrong on each half."""
    target = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]]).view(1, 1, 2, 4)
    mask = torch.tensor([[True, True, False, False]] * 2).view(1, 2, 4)
    predicted = torch.where(
        mask, target if gt_right else 1 - target, target if pseudo_right else 1 - target
    )
    return confident(predicted), target, mask


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_pseudo_voxels_weigh_alpha_and_ground_truth_voxels_one(alpha):
    wrong_on_pseudo = mix_loss(
        *_mirrored_case(True, False), outside_weight=1.0, inside_weight=alpha
    )
    wrong_on_gt = mix_loss(*_mirrored_case(False, True), outside_weight=1.0, inside_weight=alpha)
    # a wrong half: CE 200 per voxel; Dice 1 − s/(4 + s) for each class (2 targets + 2 predictions)
    wrong = (1 - S / (4 + S)) + 200.0
    torch.testing.assert_close(wrong_on_gt["loss"], torch.tensor(wrong / 2), rtol=1e-7, atol=0)
    torch.testing.assert_close(
        wrong_on_pseudo["loss"], alpha * wrong_on_gt["loss"], rtol=1e-7, atol=0
    )
    torch.testing.assert_close(wrong_on_pseudo["ce"], torch.tensor(alpha * 200.0))
    right = mix_loss(*_mirrored_case(True, True), outside_weight=1.0, inside_weight=alpha)
    assert float(right["loss"]) == 0.0


def _self_train_batch(batch: int = 2, shape=(16, 16, 16)):
    g = torch.Generator().manual_seed(3)
    labeled = {
        "image": torch.randn(batch, 1, *shape, generator=g),
        "label": torch.zeros(batch, *shape, dtype=torch.long),
    }
    return labeled, {"image": torch.randn(batch, 1, *shape, generator=g) + 10}


def test_self_training_weighs_ground_truth_one_and_pseudo_labels_alpha_in_both_mixes():
    """Teacher: foreground everywhere; labels: background; student: background everywhere.
    The student is right on ground truth and wrong on every pseudo-labeled voxel: inside the box
    in the in-mix, outside it in the out-mix, each weighed α."""
    cfg = experiment()
    labeled, unlabeled = _self_train_batch()
    out = bcp_self_train_step(
        ConstantNet(0), ConstantNet(1), labeled, unlabeled, cfg, torch.Generator().manual_seed(0)
    )
    inside = 10**3  # the 10x10x10 box of a 16^3 crop
    outside = 16**3 - inside
    alpha = cfg.bcp.u_weight
    torch.testing.assert_close(
        out["in/loss"], torch.tensor(alpha * (1 - S / (inside + S) + 200) / 2)
    )
    torch.testing.assert_close(
        out["out/loss"], torch.tensor(alpha * (1 - S / (outside + S) + 200) / 2)
    )
    torch.testing.assert_close(out["loss"], out["in/loss"] + out["out/loss"])
    assert {"in/dice", "in/ce", "out/dice", "out/ce"} <= set(out)


def test_both_mixes_of_a_step_share_one_mask_drawn_from_the_step_generator():
    cfg = experiment()
    labeled, unlabeled = _self_train_batch(batch=4)
    student = ConstantNet(0)
    bcp_self_train_step(
        student, ConstantNet(1), labeled, unlabeled, cfg, torch.Generator().manual_seed(9)
    )
    (mixed,) = student.inputs  # one forward: the in-mixes, then the out-mixes
    mix_in, mix_out = mixed[:2], mixed[2:]
    expected = box_mask(
        (16, 16, 16), sample_box((16, 16, 16), 2 / 3, torch.Generator().manual_seed(9))
    )
    assert torch.equal(mix_in == labeled["image"][:2], expected.expand(2, 1, 16, 16, 16))
    assert torch.equal(mix_out == unlabeled["image"][2:], expected.expand(2, 1, 16, 16, 16))


def test_pretraining_copy_pastes_labeled_pairs_and_averages_ce_and_dice():
    cfg = experiment()
    g = torch.Generator().manual_seed(4)
    labeled = {
        "image": torch.randn(4, 1, 16, 16, 16, generator=g),
        "label": torch.randint(0, 2, (4, 16, 16, 16), generator=g),
    }
    student = ConstantNet(1)
    out = bcp_pretrain_step(student, labeled, cfg, torch.Generator().manual_seed(2))
    mask = box_mask((16, 16, 16), sample_box((16, 16, 16), 2 / 3, torch.Generator().manual_seed(2)))
    (image,) = student.inputs
    assert torch.equal(image, torch.where(mask, labeled["image"][:2], labeled["image"][2:]))
    target = torch.where(mask, labeled["label"][:2], labeled["label"][2:])
    logits = confident(torch.ones(2, 16, 16, 16, dtype=torch.long))
    torch.testing.assert_close(out["pretrain/ce"], F.cross_entropy(logits, target))
    torch.testing.assert_close(out["pretrain/dice"], masked_dice_loss(logits, target))
    torch.testing.assert_close(out["loss"], (out["pretrain/ce"] + out["pretrain/dice"]) / 2)


# ---------------------------------------------------------------- pseudo-labels


def test_binary_pseudo_labels_threshold_the_foreground_at_one_half_inclusive():
    logits = torch.zeros(1, 2, 1, 1, 3)
    logits[0, 1, 0, 0, 1] = -1e-3  # p = 0.49975
    logits[0, 1, 0, 0, 2] = 1e-3
    labels = pseudo_labels(logits, 0.5, largest_cc=False)
    assert labels.tolist() == [[[[1, 0, 1]]]]  # p = 0.5 counts as foreground (>=)


def test_multiclass_pseudo_labels_are_the_argmax():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 4.0]]).T.reshape(
        1, 3, 1, 1, 3
    )
    assert pseudo_labels(logits, 0.5, largest_cc=False).tolist() == [[[[1, 0, 2]]]]


def test_the_largest_26_connected_component_is_kept_per_sample():
    labels = torch.zeros(2, 3, 4, 4, dtype=torch.long)
    labels[0, 0, 0, 0] = labels[0, 1, 1, 1] = labels[0, 2, 2, 2] = 1  # 3 voxels joined diagonally
    labels[0, 0, 3, 0] = labels[0, 1, 3, 0] = 1  # 2 voxels: removed
    labels[1, 1, 0, 0] = 1  # sample 1's only component, smaller than sample 0's: kept
    out = keep_largest_components(labels, 2)
    expected = labels.clone()
    expected[0, :, 3, 0] = 0
    assert torch.equal(out, expected) and out.dtype == torch.long


def test_every_class_keeps_its_own_largest_component():
    labels = torch.tensor([[1, 1, 1, 0, 1, 0, 2, 0, 2, 2, 2, 2]]).view(1, 1, 1, 12)
    out = keep_largest_components(labels, 3)
    assert out.view(-1).tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 2, 2, 2, 2]


def test_pseudo_labels_with_largest_cc_drop_stray_foreground():
    fg = torch.tensor([1, 1, 0, 1]).view(1, 1, 1, 4)
    logits = confident(fg)
    assert pseudo_labels(logits, 0.5, largest_cc=True).view(-1).tolist() == [1, 1, 0, 0]


# ---------------------------------------------------------------- EMA teacher and phases


def test_the_teacher_is_an_exponential_moving_average_with_decay_0_99():
    teacher, student = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[1.0, 2.0]]))
        teacher.bias.fill_(0.0)
        student.weight.copy_(torch.tensor([[3.0, 6.0]]))
        student.bias.fill_(1.0)
    ema_update(teacher, student, BCPConfig().ema)
    torch.testing.assert_close(
        teacher.weight, torch.tensor([[1.02, 2.04]])
    )  # 0.99·1 + 0.01·3, 0.99·2 + 0.01·6
    torch.testing.assert_close(teacher.bias, torch.tensor([0.01]))
    torch.testing.assert_close(student.weight, torch.tensor([[3.0, 6.0]]))


def test_pretraining_keeps_the_lr_and_self_training_divides_it_every_lr_step():
    phases = BCPPhases(BCPConfig(pretrain_steps=3, lr_step=2, lr_gamma=0.1))
    assert [phases.pretraining(s) for s in range(5)] == [True, True, True, False, False]
    factors = [phases.lr_factor(s) for s in range(8)]
    np.testing.assert_allclose(factors, [1, 1, 1, 1, 1, 0.1, 0.1, 0.01])


def test_self_training_starts_student_and_teacher_from_the_best_pretrained_weights():
    phases = BCPPhases(BCPConfig())
    net = nn.Linear(1, 1)
    for step, (weight, dice) in enumerate(
        [(1.0, 0.5), (2.0, 0.8), (3.0, 0.8), (4.0, 0.1)], start=1
    ):
        with torch.no_grad():
            net.weight.fill_(weight)
        phases.observe_pretrained(step, net, dice)
    assert (phases.best_step, phases.best_dice) == (2, 0.8)  # the first of equal scores
    restored = BCPPhases(BCPConfig())
    restored.load_state_dict(phases.state_dict())
    student, teacher = nn.Linear(1, 1), nn.Linear(1, 1)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    student(torch.ones(1, 1)).sum().backward()
    optimizer.step()
    restored.start_self_training(student, teacher, optimizer)
    assert float(student.weight.detach()) == float(teacher.weight.detach()) == 2.0
    assert not optimizer.state and restored.state_dict()["best_model"] is None


def test_without_validation_the_latest_pretrained_weights_are_kept():
    phases = BCPPhases(BCPConfig())
    net = nn.Linear(1, 1)
    for step in (1, 2):
        with torch.no_grad():
            net.weight.fill_(step)
        phases.observe_pretrained(step, net, None)
    assert phases.best_step == 2 and float(phases.best_model["weight"]) == 2.0


# ---------------------------------------------------------------- configs


def test_the_official_la_configuration_is_bundled():
    cfg = load_config(SegmentationExperiment, resolve_config("seg-bcp-la"))
    assert cfg.method == "bcp" and cfg.model.width == 16 and cfg.model.dropout
    assert cfg.data.patch == (80, 112, 112) and cfg.optim.batch_size == 4
    assert (cfg.bcp.pretrain_steps, cfg.optim.steps - cfg.bcp.pretrain_steps) == (2000, 15000)
    assert cfg.bcp == BCPConfig()  # the defaults are the official values
    assert cfg.eval.every == 200 and cfg.eval.largest_component and cfg.eval.blending == "constant"


@pytest.mark.parametrize("setting", ["ssl", "imbssl", "uda", "semidg"])
def test_cpu_profiles_pretrain_half_the_budget_and_keep_the_official_absolute_lr_schedule(setting):
    cfg = load_config(
        SegmentationExperiment, resolve_config(f"seg-{setting}-cpu"), {"method": "bcp"}
    )
    assert cfg.bcp.lr_step == 2500 and cfg.bcp.pretrain_steps == cfg.optim.steps // 2
    assert cfg.optim.steps == {"imbssl": 4000}.get(setting, 3000)


def test_bad_bcp_configs_name_the_key():
    with pytest.raises(ConfigError, match="below optim.steps") as info:
        experiment("bcp.pretrain_steps=10")
    assert info.value.key == "bcp.pretrain_steps"
    with pytest.raises(ConfigError, match="even batch size") as info:
        experiment("optim.batch_size=3")
    assert info.value.key == "optim.batch_size"
    with pytest.raises(ConfigError, match=r"mask_ratio") as info:
        experiment("bcp.mask_ratio=1.5")
    assert info.value.key == "bcp"
