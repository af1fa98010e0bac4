"""Scanner augmentation of detector crops (noise, kernel, slice thickness): what each operation
does to a crop, how often it is drawn, and that box targets never move."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medssl.detection import AnchorGrid, AnchorSpec
from medssl.training.detection.augment import (
    NOISE_HU,
    SHARP_KERNEL,
    SOFT_KERNEL,
    THICK_SLICES,
    ScannerAugment,
    ScannerParams,
    apply_scanner,
)
from medssl.training.detection.config import DataConfig
from tests.training.detection.helpers import checkpoint, noise_scans, tiny_config

pytestmark = [pytest.mark.slow]

HU_RANGE = 1800.0  # the lung window [-1200, 600]
PER_HU = 2.0 / HU_RANGE


def _lung(shape=(24, 32, 32)) -> np.ndarray:
    """A flat crop of aerated lung (-850 HU) on the [-1, 1] window."""
    return np.full(shape, -850.0 * PER_HU + (1200.0 * PER_HU - 1.0), np.float32)


def test_noise_has_the_drawn_standard_deviation_in_hu():
    for sigma in (10.0, 35.0):
        out = apply_scanner(_lung(), ScannerParams(noise_hu=sigma, noise_seed=3), HU_RANGE)
        assert out.dtype == np.float32 and out.shape == (24, 32, 32)
        assert out.std() / PER_HU == pytest.approx(sigma, rel=0.02)
        assert abs(out.mean() - _lung().mean()) < 0.1 * sigma * PER_HU
        # correlated, as filtered back-projection noise is: neighbours are alike
        assert np.corrcoef(out[:, :, :-1].ravel(), out[:, :, 1:].ravel())[0, 1] > 0.3


def test_kernels_and_slice_thickness_act_on_their_axes():
    plane = np.full((21, 21, 21), -0.5, np.float32)
    plane[10] = 0.5  # one bright axial plane: a z structure
    column = np.full((21, 21, 21), -0.5, np.float32)
    column[:, 10, :] = 0.5  # one bright coronal plane: an in-plane (y) structure
    soft = ScannerParams(blur_sigma=0.8)
    thick = ScannerParams(z_sigma=1.3)
    np.testing.assert_allclose(
        apply_scanner(plane, soft, HU_RANGE), plane, atol=1e-6
    )  # in-plane only
    assert apply_scanner(column, soft, HU_RANGE)[:, 10, :].max() < 0.4
    np.testing.assert_allclose(apply_scanner(column, thick, HU_RANGE), column, atol=1e-6)  # z only
    spread = apply_scanner(plane, thick, HU_RANGE)
    assert spread[10].max() < 0.4 and spread[9].min() > -0.4

    edge = np.full((8, 16, 16), -0.6, np.float32)
    edge[:, :, 8:] = 0.2
    sharp = apply_scanner(edge, ScannerParams(sharpen=0.8), HU_RANGE)
    assert sharp.max() > 0.25 and sharp.min() < -0.65  # overshoot on both sides of the edge
    assert sharp[:, :, 0].mean() == pytest.approx(-0.6, abs=1e-4)  # flat regions unchanged
    with pytest.raises(ValueError, match="soft or sharp"):
        ScannerParams(blur_sigma=0.5, sharpen=0.5)


def test_output_is_clipped_to_the_window_and_nothing_drawn_is_nothing_changed():
    crop = np.linspace(-1, 1, 16 * 16 * 16, dtype=np.float32).reshape(16, 16, 16)
    out = apply_scanner(crop, ScannerParams(noise_hu=40.0, sharpen=0.8), HU_RANGE)
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert apply_scanner(crop, ScannerParams(), HU_RANGE) is crop
    with pytest.raises(ValueError, match="Z, Y, X"):
        apply_scanner(crop[0], ScannerParams(noise_hu=5.0), HU_RANGE)


def test_draws_follow_the_documented_probabilities():
    rng = np.random.default_rng(0)
    off = ScannerAugment(0.0, HU_RANGE)
    state = rng.bit_generator.state
    assert (
        off.sample(rng) == ScannerParams() and rng.bit_generator.state == state
    )  # p = 0 draws nothing

    draws = [ScannerAugment(0.8, HU_RANGE).sample(rng) for _ in range(4000)]
    fields = ("blur_sigma", "sharpen", "z_sigma", "noise_hu")
    augmented = [d for d in draws if any(getattr(d, f) is not None for f in fields)]

    def share(field: str) -> float:
        return np.mean([getattr(d, field) is not None for d in draws])

    assert share("blur_sigma") == pytest.approx(0.8 * SOFT_KERNEL[0], abs=0.03)
    assert share("sharpen") == pytest.approx(0.8 * SHARP_KERNEL[0], abs=0.03)
    assert share("z_sigma") == pytest.approx(0.8 * THICK_SLICES[0], abs=0.03)
    assert share("noise_hu") == pytest.approx(0.8 * NOISE_HU[0], abs=0.03)
    # p times the chance of at least one operation: 0.8 * (1 - 0.3 * 0.7 * 0.5)
    assert len(augmented) / len(draws) == pytest.approx(0.8 * (1 - 0.3 * 0.7 * 0.5), abs=0.03)
    assert all(NOISE_HU[1] <= d.noise_hu <= NOISE_HU[2] for d in draws if d.noise_hu is not None)
    assert all(
        THICK_SLICES[1] <= d.z_sigma <= THICK_SLICES[2] for d in draws if d.z_sigma is not None
    )
    with pytest.raises(ValueError):
        ScannerAugment(1.5, HU_RANGE)
    with pytest.raises(ValueError, match="probability"):
        DataConfig(scanner_augment=-0.1)


def test_labeled_crops_keep_their_targets_and_change_only_their_intensities():
    from medssl.training.detection.data import LabeledPatches

    grid = AnchorGrid.build(AnchorSpec(), (32, 32, 32))
    scans = noise_scans()
    plain = LabeledPatches(scans, grid, 0.5, True, -1.0, 7)
    augmented = LabeledPatches(
        scans, grid, 0.5, True, -1.0, 7, scanner=ScannerAugment(1.0, HU_RANGE)
    )
    changed = 0
    for index in range(40):
        a, b = plain[index], augmented[index]
        for key in ("labels", "deltas", "boxes", "n_boxes"):
            torch.testing.assert_close(b[key], a[key])
        changed += not torch.equal(a["image"], b["image"])
        torch.testing.assert_close(
            augmented[index]["image"], b["image"]
        )  # a pure function of the index
    assert changed >= 30


def test_the_trainer_augments_when_the_config_asks(luna, tmp_path):
    short = ("optim.steps=2", "eval.every=2", "data.test_subsets=[]", "eval.bn_windows=0")
    runs = {}
    for p in (0.0, 1.0):
        out = tmp_path / f"p{p}"
        from medssl.training.detection.trainer import train_detector

        train_detector(
            tiny_config("supervised-det", *short, f"data.scanner_augment={p}"),
            luna,
            out,
            n_labeled=4,
            device="cpu",
        )
        runs[p] = checkpoint(out)["model"]
    assert any(
        not torch.equal(runs[0.0][n], runs[1.0][n]) for n in runs[0.0] if n.endswith("weight")
    )
