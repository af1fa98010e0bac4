"""A&D's building blocks: SVDA augmentation, DRS class weights, the Dice + CE loss."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from scipy import ndimage

torch = pytest.importorskip("torch")

from torch.nn import functional as F

from medssl.training.segmentation.drs import DifficultyWeights, hard_batch_dice
from medssl.training.segmentation.losses import dice_ce_loss, soft_dice
from medssl.training.segmentation.svda import OPS, SVDA, SVDAParams, apply_svda


def patch(shape=(12, 16, 16), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(50.0, 20.0, shape).astype(np.float32)


def labels(shape=(12, 16, 16), seed=0, n=4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, shape).astype(np.int64)


# ---------------------------------------------------------------- SVDA: sampling


def test_sample_is_reproducible_under_a_seed():
    svda = SVDA()
    draws_a = [svda.sample(np.random.default_rng(s)) for s in range(20)]
    draws_b = [svda.sample(np.random.default_rng(s)) for s in range(20)]
    assert draws_a == draws_b
    assert len(set(draws_a)) > 10


def test_sampling_consumes_the_rng_the_same_way_for_any_image():
    svda = SVDA(image_order=1)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    svda(patch(seed=1), labels(), rng_a)
    svda(patch(seed=2) * 10, None, rng_b)
    assert rng_a.bit_generator.state == rng_b.bit_generator.state


def test_call_is_sample_then_apply():
    svda = SVDA(image_order=1)
    image, label = patch(), labels()
    for seed in range(5):
        out, lab = svda(image, label, np.random.default_rng(seed))
        params = svda.sample(np.random.default_rng(seed))
        ref, ref_lab = apply_svda(image, label, params, image_order=1)
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(lab, ref_lab)


def test_exactly_n_ops_are_chosen_and_only_chosen_ops_are_applied():
    svda = SVDA()
    applied_counts = []
    for seed in range(2000):
        params = svda.sample(np.random.default_rng(seed))
        assert len(params.chosen) == 3 and set(params.chosen) <= set(OPS)
        assert set(params.applied) <= set(params.chosen)
        applied_counts.append(len(params.applied))
    # Each chosen op is kept with p = 0.7: 2.1 applied ops per draw on average.
    assert np.mean(applied_counts) == pytest.approx(2.1, abs=0.1)
    assert 0 in applied_counts and 3 in applied_counts


def test_p_one_sets_all_chosen_ops_and_p_zero_none():
    for seed in range(50):
        params = SVDA(p=1.0).sample(np.random.default_rng(seed))
        assert params.applied == tuple(op for op in OPS if op in params.chosen)
        assert len(params.applied) == 3
        assert SVDA(p=0.0).sample(np.random.default_rng(seed)).applied == ()


def test_sampled_values_lie_in_their_ranges():
    svda = SVDA(p=1.0, n_ops=6)
    draws = [svda.sample(np.random.default_rng(s)) for s in range(300)]
    assert all(-15 <= d.rotation_deg <= 15 for d in draws)
    assert all(0.7 <= d.scale <= 1.0 for d in draws)
    assert all(
        0.7 <= v <= 1.3 for d in draws for v in (d.blur_sigma, d.brightness, d.contrast, d.gamma)
    )
    # batchgenerators' two-sided draw: for the zoom range (0.7, 1.0) half of the draws are 1.
    assert np.mean([d.scale == 1.0 for d in draws]) == pytest.approx(0.5, abs=0.1)
    assert np.mean([d.contrast < 1.0 for d in draws]) == pytest.approx(0.5, abs=0.1)


def test_invalid_arguments_name_the_bad_value():
    with pytest.raises(ValueError, match="n_ops"):
        SVDA(n_ops=7)
    with pytest.raises(ValueError, match="p must"):
        SVDA(p=1.5)
    with pytest.raises(ValueError, match="scale"):
        SVDA(scale=(1.0, 0.7))
    with pytest.raises(ValueError, match="gamma"):
        SVDA(gamma=(0.0, 1.3))
    with pytest.raises(ValueError, match="image_order"):
        SVDA(image_order=7)
    with pytest.raises(ValueError, match="blur_sigma is set"):
        SVDAParams(chosen=("rotation",), blur_sigma=1.0)
    with pytest.raises(ValueError, match="chosen"):
        SVDAParams(chosen=("shear",))
    with pytest.raises(ValueError, match="Z, Y, X"):
        apply_svda(np.zeros((4, 4), np.float32), None, SVDAParams())
    with pytest.raises(ValueError, match="label shape"):
        apply_svda(patch(), labels(shape=(12, 16, 15)), SVDAParams())
    with pytest.raises(ValueError, match="integer"):
        apply_svda(patch(), labels().astype(np.float32), SVDAParams())


# ---------------------------------------------------------------- SVDA: applying


def test_identity_params_give_identical_output():
    image, label = patch(), labels()
    for params in (
        SVDAParams(),
        SVDAParams(chosen=("rotation", "blur", "gamma")),  # chosen, all skipped by p
        SVDAParams(chosen=("rotation", "scale"), rotation_deg=0.0, scale=1.0),
    ):
        out, lab = apply_svda(image, label, params)
        np.testing.assert_array_equal(out, image)
        np.testing.assert_array_equal(lab, label)


def test_random_draws_keep_shapes_dtypes_and_the_label_set():
    image, label = patch(), labels()
    svda = SVDA(p=1.0, n_ops=6, image_order=1)
    for seed in range(5):
        out, lab = svda(image, label, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.float32
        assert lab.shape == label.shape and lab.dtype == label.dtype
        assert set(np.unique(lab)) <= set(np.unique(label))
    np.testing.assert_array_equal(image, patch())  # inputs untouched


@pytest.mark.parametrize("order", [1, 3])
def test_rotation_by_90_degrees_is_rot90_in_the_yx_plane(order):
    cube = patch(shape=(6, 15, 15))
    label = labels(shape=(6, 15, 15))
    params = SVDAParams(chosen=("rotation",), rotation_deg=90.0)
    out, lab = apply_svda(cube, label, params, image_order=order)
    inner = (slice(None), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(out[inner], np.rot90(cube, 1, axes=(1, 2))[inner], atol=1e-3)
    np.testing.assert_array_equal(lab, np.rot90(label, 1, axes=(1, 2)))
    # A custom SVDA whose only angle is 90 does the same.
    svda = SVDA(n_ops=1, p=1.0, rotation_deg=(90.0, 90.0))
    rng = next(
        np.random.default_rng(s)
        for s in range(100)
        if svda.sample(np.random.default_rng(s)).chosen == ("rotation",)
    )
    assert svda.sample(rng).rotation_deg == 90.0


def test_zoom_below_one_magnifies_about_the_centre():
    image = patch(shape=(9, 9, 9))
    label = labels(shape=(9, 9, 9))
    params = SVDAParams(chosen=("scale",), scale=0.5)
    out, lab = apply_svda(image, label, params, image_order=1)
    # Output voxel o samples input c + 0.5·(o − c), c = 4: even offsets land on voxels.
    for o in [(4, 4, 4), (0, 4, 8), (8, 0, 2), (2, 6, 0)]:
        src = tuple(4 + (i - 4) // 2 for i in o)
        assert out[o] == pytest.approx(image[src], abs=1e-5)
        assert lab[o] == label[src]


def test_rotation_and_zoom_are_one_resampling_in_either_order():
    cube = patch(shape=(6, 13, 13))
    label = labels(shape=(6, 13, 13))
    both = SVDAParams(chosen=("rotation", "scale"), rotation_deg=90.0, scale=0.8)
    zoom = SVDAParams(chosen=("scale",), scale=0.8)
    out, lab = apply_svda(cube, label, both, image_order=3)
    rotated = np.ascontiguousarray(np.rot90(cube, 1, axes=(1, 2)))
    ref, ref_lab = apply_svda(rotated, np.rot90(label, 1, axes=(1, 2)), zoom, image_order=3)
    np.testing.assert_allclose(out, ref, atol=1e-3)
    np.testing.assert_array_equal(lab, ref_lab)


def test_border_is_padded_with_the_minimum_or_pad_value():
    image = np.full((4, 21, 21), 7.0, np.float32)
    image[0, 0, 0] = -3.0
    label = np.ones((4, 21, 21), np.int64)
    params = SVDAParams(chosen=("rotation",), rotation_deg=45.0)
    out, lab = apply_svda(image, label, params, image_order=1)
    assert out[1, 0, 0] == pytest.approx(-3.0) and lab[1, 0, 0] == 0
    out, _ = apply_svda(image, label, params, image_order=1, pad_value=-1000.0)
    assert out[1, 0, 0] == pytest.approx(-1000.0)
    assert out[1, 10, 10] == pytest.approx(7.0) and lab[1, 10, 10] == 1


def test_intensity_ops_follow_batchgenerators_formulas():
    x = patch().astype(np.float64)
    lo, hi, mean, std = x.min(), x.max(), x.mean(), x.std()

    out, _ = apply_svda(x, None, SVDAParams(chosen=("blur",), blur_sigma=1.1))
    np.testing.assert_allclose(out, ndimage.gaussian_filter(x.astype(np.float32), 1.1), rtol=1e-6)

    out, _ = apply_svda(x, None, SVDAParams(chosen=("brightness",), brightness=1.2))
    np.testing.assert_allclose(out, x * 1.2, rtol=1e-5)

    out, _ = apply_svda(x, None, SVDAParams(chosen=("contrast",), contrast=1.3))
    expected = np.clip((x - mean) * 1.3 + mean, lo, hi)  # preserve_range=True
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    assert out.min() >= lo - 1e-4 and out.max() <= hi + 1e-4

    out, _ = apply_svda(x, None, SVDAParams(chosen=("gamma",), gamma=0.8))
    span = hi - lo + 1e-7
    g = ((x - lo) / span) ** 0.8 * span + lo
    expected = (g - g.mean()) / (g.std() + 1e-8) * std + mean  # retain_stats=True
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)
    assert out.mean() == pytest.approx(mean, rel=1e-4) and out.std() == pytest.approx(std, rel=1e-4)


def test_intensity_ops_run_after_the_spatial_ops():
    image = patch()
    spatial = SVDAParams(chosen=("rotation",), rotation_deg=10.0)
    both = SVDAParams(chosen=("rotation", "brightness"), rotation_deg=10.0, brightness=0.9)
    rotated, _ = apply_svda(image, None, spatial, image_order=1)
    out, _ = apply_svda(image, None, both, image_order=1)
    # Pad value is the patch minimum before scaling, so order shows at the border too.
    np.testing.assert_allclose(out, rotated * np.float32(0.9), rtol=1e-6)


# ---------------------------------------------------------------- DRS


def official_dice(tp, fp, fn, eps=1e-8):
    return (2 * tp + eps) / (2 * tp + fp + fn + eps + 1e-8)


def as_logits(pred: list[int], c: int) -> torch.Tensor:
    """(1, C, 1, 1, N) logits whose argmax is ``pred``."""
    return F.one_hot(torch.tensor(pred), c).T.float().reshape(1, c, 1, 1, len(pred)) * 5.0


def test_hard_batch_dice_counts_over_batch_and_space():
    target = torch.tensor([0, 0, 1, 1, 2]).reshape(1, 1, 1, 5)
    logits = as_logits([0, 1, 1, 1, 0], 3)
    dice = hard_batch_dice(logits, target)
    expected = [official_dice(1, 1, 1), official_dice(2, 1, 0), official_dice(0, 0, 1)]
    np.testing.assert_allclose(dice.numpy(), expected, rtol=1e-6)
    # A class absent from both prediction and label: ε / 2ε = 1/2, as the official code.
    assert (
        hard_batch_dice(as_logits([0, 0], 3), torch.zeros(1, 1, 1, 2, dtype=torch.long))[2] == 0.5
    )


def test_two_steps_match_a_hand_computation():
    m, eps, c = 0.98, 1e-8, 2
    target = torch.tensor([0, 0, 1, 1]).reshape(1, 1, 1, 1, 4)  # (B, 1, Z, Y, X)
    drs = DifficultyWeights(c)

    last = [eps, eps]
    learn_bar, unlearn_bar, dice_bar = [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]
    steps = [
        ([0, 0, 1, 1], [official_dice(2, 0, 0), official_dice(2, 0, 0)]),  # perfect
        ([0, 0, 0, 1], [official_dice(2, 1, 0), official_dice(1, 0, 1)]),  # 0.8, 2/3
    ]
    for pred, dice in steps:
        expected = []
        for k in range(c):
            delta = dice[k] - last[k]
            log_ratio = math.log(dice[k] / last[k])
            learn = max(delta, 0.0) * log_ratio
            unlearn = min(delta, 0.0) * log_ratio
            learn_bar[k] = m * learn_bar[k] + (1 - m) * learn
            unlearn_bar[k] = m * unlearn_bar[k] + (1 - m) * unlearn
            dice_bar[k] = m * dice_bar[k] + (1 - m) * (1 - dice[k])
            difficulty = ((unlearn_bar[k] + eps) / (learn_bar[k] + eps)) ** (1 / 5)
            expected.append(difficulty * dice_bar[k] * c)
            last[k] = dice[k]
        weights = drs.update(as_logits(pred, c), target)
        assert weights.shape == (c,) and weights.dtype == torch.float32
        np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-4)
    # Step 2 numbers, spelled out: class 1 fell from ~1 to 2/3 (unlearned), class 0 to 0.8.
    assert steps[1][1] == pytest.approx([0.8, 2 / 3])
    assert weights[1] > weights[0]


def test_a_perfect_class_ends_with_a_lower_weight_than_a_missed_class():
    c = 3
    target = torch.tensor([0, 0, 1, 1, 2, 2]).reshape(1, 6, 1, 1)  # (B, Z, Y, X)
    pred = [0, 0, 1, 1, 0, 0]  # class 1 perfect, class 2 always missed
    drs = DifficultyWeights(c)
    for _ in range(20):
        weights = drs.update(as_logits(pred, c).reshape(1, c, 6, 1, 1), target)
    assert weights[1] < 0.1 < weights[2]
    assert weights[2] == pytest.approx(c, rel=0.05)


def test_state_round_trip_resumes_the_same_weights():
    rng = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(2, 4, 3, 4, 5, generator=rng),
            torch.randint(0, 4, (2, 1, 3, 4, 5), generator=rng),
        )
        for _ in range(5)
    ]
    drs = DifficultyWeights(4)
    for logits, target in batches[:3]:
        drs.update(logits, target)
    buffer = io.BytesIO()
    torch.save(drs.state_dict(), buffer)
    buffer.seek(0)
    resumed = DifficultyWeights(4)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.steps == 3
    for logits, target in batches[3:]:
        torch.testing.assert_close(resumed.update(logits, target), drs.update(logits, target))
    with pytest.raises(ValueError, match="classes"):
        DifficultyWeights(3).load_state_dict(drs.state_dict())


def test_drs_rejects_bad_inputs():
    drs = DifficultyWeights(3)
    with pytest.raises(ValueError, match="classes"):
        drs.update(torch.randn(1, 4, 2, 2, 2), torch.zeros(1, 2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        drs.update(torch.randn(1, 3, 2, 2, 2), torch.full((1, 2, 2, 2), 3))
    with pytest.raises(ValueError, match="does not match"):
        drs.update(torch.randn(1, 3, 2, 2, 2), torch.zeros(1, 2, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        drs.update(torch.randn(1, 3, 2, 2, 2), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="num_classes"):
        DifficultyWeights(1)


# ---------------------------------------------------------------- Dice + CE


def tiny_case():
    rng = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 1, 2, 3, generator=rng)
    target = torch.randint(0, 3, (2, 1, 1, 2, 3), generator=rng)
    return logits, target


def manual_dice_ce(logits: torch.Tensor, target: torch.Tensor, w: np.ndarray) -> float:
    """The loss with numpy loops: CE weighted mean, soft batch Dice over foreground."""
    x = logits.double().numpy().transpose(1, 0, 2, 3, 4).reshape(3, -1)  # (C, N)
    y = target.numpy().reshape(-1)
    p = np.exp(x - x.max(0)) / np.exp(x - x.max(0)).sum(0)
    ce = sum(-w[y[i]] * np.log(p[y[i], i]) for i in range(len(y))) / sum(
        w[y[i]] for i in range(len(y))
    )
    dice = []
    for k in (1, 2):
        onehot = (y == k).astype(float)
        tp, fp, fn = (p[k] * onehot).sum(), (p[k] * (1 - onehot)).sum(), ((1 - p[k]) * onehot).sum()
        dice.append(w[k] * (2 * tp + 1) / (2 * tp + fp + fn + 1 + 1e-8))
    return ce + 1 - np.mean(dice)


def test_weighted_loss_matches_a_manual_computation():
    logits, target = tiny_case()
    w = np.array([0.5, 2.0, 3.5])
    loss = dice_ce_loss(logits, target, torch.tensor(w, dtype=torch.float32))
    assert loss.item() == pytest.approx(manual_dice_ce(logits, target, w), rel=1e-5)
    assert dice_ce_loss(logits, target).item() == pytest.approx(
        manual_dice_ce(logits, target, np.ones(3)), rel=1e-5
    )


def test_ce_part_is_torch_cross_entropy():
    logits, target = tiny_case()
    w = torch.tensor([0.5, 2.0, 3.5])
    for weights in (None, w):
        dice = soft_dice(logits, target)[1:]
        dice_term = 1 - (dice if weights is None else dice * weights[1:]).mean()
        ce = dice_ce_loss(logits, target, weights) - dice_term
        torch.testing.assert_close(ce, F.cross_entropy(logits, target[:, 0], weight=weights))


def test_unit_weights_equal_the_unweighted_loss_and_target_shapes_agree():
    logits, target = tiny_case()
    plain = dice_ce_loss(logits, target)
    torch.testing.assert_close(dice_ce_loss(logits, target, torch.ones(3)), plain)
    torch.testing.assert_close(dice_ce_loss(logits, target[:, 0]), plain)
    assert plain.item() >= 0


def test_confident_correct_logits_give_a_near_zero_loss():
    target = torch.randint(0, 3, (2, 4, 4, 4), generator=torch.Generator().manual_seed(2))
    target[0, 0, 0, :3] = torch.tensor([0, 1, 2])  # every class present
    logits = F.one_hot(target, 3).permute(0, 4, 1, 2, 3).float() * 30.0
    assert soft_dice(logits, target)[1:].min().item() == pytest.approx(1.0, abs=1e-6)
    assert dice_ce_loss(logits, target).item() == pytest.approx(0.0, abs=1e-5)


def test_loss_has_gradients_and_rejects_bad_weights():
    logits, target = tiny_case()
    logits.requires_grad_(True)
    dice_ce_loss(logits, target, torch.tensor([1.0, 2.0, 3.0])).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="class_weights"):
        dice_ce_loss(logits, target, torch.ones(4))
