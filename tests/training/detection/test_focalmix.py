"""FocalMix's pieces: soft-target focal loss, target prediction, MixUp (paper §3)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.nn import functional as F

from medssl.detection import CUBE_GROUP, AnchorGrid, AnchorSpec, assign_anchors
from medssl.training.detection.focalmix import (
    apply_symmetry,
    guess_targets,
    image_mixup,
    object_mixup,
    objects_from_targets,
    sample_lambda,
    sharpen,
    transform_anchor_targets,
)
from medssl.training.detection.losses import FocalConfig, detection_loss, soft_focal_loss
from medssl.training.networks.detector import (
    CPU_SMALL,
    DetectorInference,
    FPNDetector,
    decode_boxes,
    flatten_levels,
)

SPEC = AnchorSpec()


def focal_loss(logits, y, alpha0=0.05, alpha1=0.95, gamma=2.0):
    """Lin et al. eq. 1, written independently: -α_t (1 - p_t)^γ log p_t."""
    p = torch.sigmoid(logits)
    p_t = torch.where(y == 1, p, 1 - p)
    alpha_t = torch.where(y == 1, torch.tensor(alpha1), torch.tensor(alpha0))
    return -alpha_t * (1 - p_t) ** gamma * torch.log(p_t)


def test_soft_focal_loss_is_the_focal_loss_for_hard_targets():
    logits = torch.linspace(-6, 6, 101)
    for value in (0.0, 1.0):
        y = torch.full_like(logits, value)
        torch.testing.assert_close(
            soft_focal_loss(logits, y), focal_loss(logits, y), rtol=1e-5, atol=1e-7
        )


def test_soft_focal_loss_for_a_soft_target_follows_eq_9():
    logit, y = torch.tensor([0.3]), torch.tensor([0.7])
    p = torch.sigmoid(logit)
    expected = (
        (0.05 + 0.7 * 0.9) * (0.7 - p).abs() ** 2 * -(0.7 * torch.log(p) + 0.3 * torch.log(1 - p))
    )
    torch.testing.assert_close(soft_focal_loss(logit, y), expected)
    # The loss vanishes where the prediction equals the soft target (β = |y - p|^γ = 0).
    assert soft_focal_loss(torch.logit(torch.tensor([0.7])), y).item() == pytest.approx(
        0.0, abs=1e-12
    )


def test_ablations_use_pseudo_hard_targets_for_alpha_and_beta():
    logit, y = torch.tensor([0.3]), torch.tensor([0.7])
    p = torch.sigmoid(logit)
    ce = F.binary_cross_entropy_with_logits(logit, y)
    no_alpha = soft_focal_loss(logit, y, FocalConfig(soft_alpha=False))
    no_beta = soft_focal_loss(logit, y, FocalConfig(soft_beta=False))
    torch.testing.assert_close(no_alpha, 0.95 * (0.7 - p).abs() ** 2 * ce)
    torch.testing.assert_close(no_beta, (0.05 + 0.7 * 0.9) * (1 - p) ** 2 * ce)


def test_detection_loss_ignores_anchors_marked_minus_one_and_normalises_by_positives():
    out = torch.zeros(1, 4, 5)
    targets = torch.tensor([[1.0, 0.0, -1.0, 1.0]])
    loss = detection_loss(out, targets, torch.zeros(1, 4, 4), targets == 1)
    per = soft_focal_loss(torch.zeros(4), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert loss["cls"].item() == pytest.approx((per[0] + per[1] + per[3]).item() / 2)
    assert loss["box"].item() == 0.0


def test_sharpening_two_classes():
    p = torch.tensor([0.2, 0.5, 0.9])
    t = 0.7
    expected = p ** (1 / t) / (p ** (1 / t) + (1 - p) ** (1 / t))
    torch.testing.assert_close(sharpen(p, t), expected)
    assert sharpen(torch.tensor([0.9]), 0.7).item() > 0.9 and sharpen(
        torch.tensor([0.5]), 0.7
    ).item() == pytest.approx(0.5)


def test_flattened_outputs_follow_the_anchor_grid_order():
    model = FPNDetector(CPU_SMALL, SPEC)
    levels = model(torch.zeros(1, 1, 32, 32, 32))
    grid = AnchorGrid.build(SPEC, (32, 32, 32))
    assert [tuple(m.shape[2:]) for m in levels] == list(grid.level_shapes)
    assert flatten_levels(levels).shape == (1, grid.n_anchors, 5)
    # The objectness prior is 0.01 at initialisation (RetinaNet).
    assert torch.sigmoid(flatten_levels(levels)[..., 0]).mean().item() == pytest.approx(
        0.01, rel=0.2
    )


def test_decoding_inverts_encoding():
    grid = AnchorGrid.build(SPEC, (32, 32, 32))
    idx = np.array([0, 100, 4500, grid.n_anchors - 1])
    boxes = np.array(
        [[3, 4, 5, 6], [10, 9, 8, 12], [20, 21, 22, 9], [30, 20, 10, 40]], dtype=np.float32
    )
    from medssl.detection import encode_boxes

    deltas = encode_boxes(grid.centres[idx], grid.sizes[idx], boxes)
    decoded = decode_boxes(
        torch.from_numpy(deltas)[None],
        torch.from_numpy(grid.centres[idx]),
        torch.from_numpy(grid.sizes[idx]),
    )
    torch.testing.assert_close(decoded[0], torch.from_numpy(boxes), rtol=1e-5, atol=1e-4)


def test_inference_module_returns_boxes_and_probabilities():
    net = DetectorInference(FPNDetector(CPU_SMALL, SPEC).eval(), (32, 32, 32))
    boxes, scores = net(torch.zeros(2, 1, 32, 32, 32))
    n = AnchorGrid.build(SPEC, (32, 32, 32)).n_anchors
    assert boxes.shape == (2, n, 4) and scores.shape == (2, n)
    assert scores.min().item() >= 0 and scores.max().item() <= 1


class PoolModel(torch.nn.Module):
    """Equivariant under every cube symmetry: objectness = mean intensity of each cell."""

    def forward(self, x):
        return [F.avg_pool3d(x, s).repeat(1, 5, 1, 1, 1) for s in SPEC.strides]


class CornerModel(PoolModel):
    """Not equivariant: adds a ramp along x."""

    def forward(self, x):
        ramp = torch.linspace(0, 1, x.shape[-1])
        return super().forward(x + ramp)


def test_target_prediction_maps_each_transform_back_exactly():
    x = torch.randn(2, 1, 32, 32, 32)
    elements = [CUBE_GROUP[i] for i in (0, 5, 17, 46)]
    sharp, mean = guess_targets(PoolModel(), x, elements, 0.7)
    _, single_mean = guess_targets(PoolModel(), x, elements[:1], 0.7)
    torch.testing.assert_close(mean, single_mean)  # an equivariant model agrees with itself
    torch.testing.assert_close(sharp, sharpen(single_mean, 0.7))
    _, skewed = guess_targets(CornerModel(), x, elements, 0.7)
    _, skewed_single = guess_targets(CornerModel(), x, elements[:1], 0.7)
    assert not torch.allclose(skewed, skewed_single)  # the ensemble really averages K views


@pytest.mark.parametrize("index", [3, 21, 40])
def test_anchor_targets_follow_the_image_transform(index):
    """Assigning the transformed boxes gives the transformed targets: anchors map onto anchors."""
    g = CUBE_GROUP[index]
    grid = AnchorGrid.build(SPEC, (32, 32, 32))
    boxes = np.array([[6.0, 20.0, 11.0, 7.0], [25.0, 9.0, 17.0, 12.0]])
    before = torch.from_numpy(assign_anchors(grid, boxes).labels)[None]
    moved = boxes.copy()
    moved[:, :3] = g.apply_points(boxes[:, :3], (32, 32, 32))
    after = torch.from_numpy(assign_anchors(grid, moved).labels)[None]
    torch.testing.assert_close(transform_anchor_targets(g, before, grid), after)


def test_image_mixup_mixes_images_and_anchor_targets():
    a, b = torch.ones(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2)
    ya, yb = torch.tensor([[1.0, 0.0, -1.0, 0.2]]), torch.tensor([[0.0, 1.0, 0.0, -1.0]])
    images, targets = image_mixup(a, ya, b, yb, 0.8)
    torch.testing.assert_close(images, torch.full_like(a, 0.8))
    torch.testing.assert_close(targets, torch.tensor([[0.8, 0.2, -1.0, -1.0]]))


def test_lambda_keeps_the_first_sample_dominant():
    rng = np.random.default_rng(0)
    values = [sample_lambda(0.2, rng) for _ in range(200)]
    assert min(values) >= 0.5 and max(values) <= 1.0


def test_object_mixup_blends_only_inside_object_cubes():
    images = torch.zeros(2, 1, 16, 16, 16)
    images[1] = 1.0
    objects = [np.array([[8.0, 8.0, 8.0, 4.0]]), np.array([[4.0, 4.0, 4.0, 6.0]])]
    out = object_mixup(images, objects, images, objects, eta=0.2, rng=np.random.default_rng(1))
    inside = out[0, 0, 6:10, 6:10, 6:10]
    assert inside.min().item() > 0 and inside.max().item() <= 0.5  # zeros mixed with ones, λ̃ >= 0.5
    mask = torch.ones(16, 16, 16, dtype=torch.bool)
    mask[6:10, 6:10, 6:10] = False
    assert out[0, 0][mask].abs().max().item() == 0.0
    assert out[1, 0, 1:7, 1:7, 1:7].max().item() < 1.0  # the other object got mixed too
    assert torch.equal(images[0], torch.zeros(1, 16, 16, 16))  # inputs untouched


def test_object_mixup_needs_two_objects():
    images = torch.rand(1, 1, 16, 16, 16)
    out = object_mixup(
        images,
        [np.array([[8.0, 8, 8, 4]])],
        images,
        [np.array([[8.0, 8, 8, 4]])],
        0.2,
        np.random.default_rng(0),
    )
    assert torch.equal(out, images)


def test_confident_anchors_become_objects_after_nms():
    grid = AnchorGrid.build(SPEC, (32, 32, 32))
    p = torch.zeros(1, grid.n_anchors)
    p[0, [10, 11, 500]] = torch.tensor([0.95, 0.9, 0.85])
    objects = objects_from_targets(p, grid, threshold=0.8)
    assert len(objects) == 1
    assert 1 <= len(objects[0]) <= 3 and objects[0].shape[1] == 4
    np.testing.assert_array_equal(objects[0][0, :3], grid.centres[10])


def test_symmetry_on_tensors_matches_numpy():
    array = np.random.default_rng(0).random((1, 2, 4, 6, 8)).astype(np.float32)
    for g in CUBE_GROUP[::7]:
        np.testing.assert_array_equal(
            apply_symmetry(g, torch.from_numpy(array)).numpy(), g.apply(array)
        )
