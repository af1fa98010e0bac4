"""`medssl-train fixmatch` / `flexmatch` (issue 9): the unlabeled loss on hand-made tensors, the
weak/strong crops, and tiny end-to-end runs (logs, the CPL memory in checkpoints, exact resume)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner

from medssl.cli.train import train
from medssl.training.segmentation.config import (
    FixMatchConfig,
    SegmentationExperiment,
    ThresholdConfig,
)
from medssl.training.segmentation.data import LabeledVolume, SegCrops
from medssl.training.segmentation.losses import unlabeled_ce
from medssl.training.segmentation.svda import SVDA, apply_svda
from medssl.training.segmentation.trainer import train_segmenter
from medssl.training.threshold import VoxelMemoryLayout
from tests.training.segmentation.helpers import (
    TINY,
    checkpoint,
    logged,
    tiny_config,
    train_interrupted_then_resumed,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# -- the unlabeled loss ---------------------------------------------------------------------------


def test_unlabeled_ce_averages_cross_entropy_over_kept_voxels_only():
    logits = torch.tensor([[[0.0, 2.0, 0.0, 5.0]], [[1.0, 0.0, 3.0, -5.0]]]).permute(
        1, 0, 2
    )  # (1, 2, 4)
    pseudo = torch.tensor([[1, 0, 0, 1]])
    keep = torch.tensor([[True, False, True, False]])
    # per voxel CE: -log softmax(logits[:, :, v])[pseudo[v]]
    ce = [-torch.log_softmax(logits[0, :, v], 0)[pseudo[0, v]] for v in range(4)]
    expected = (ce[0] + ce[2]) / 2  # voxels 1 and 3 dropped, mean over the 2 kept
    torch.testing.assert_close(unlabeled_ce(logits, pseudo, keep), expected)
    # hand values: voxel 0 logits (0, 1) label 1 -> log(1 + e^-1); voxel 2 (0, 3) label 0 -> log(1
    # + e^3)
    torch.testing.assert_close(
        unlabeled_ce(logits, pseudo, keep),
        torch.tensor((np.log1p(np.exp(-1.0)) + np.log1p(np.exp(3.0))) / 2, dtype=torch.float32),
    )


def test_unlabeled_ce_is_zero_with_a_gradient_path_when_nothing_is_kept():
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    loss = unlabeled_ce(
        logits,
        torch.zeros(2, 4, 4, 4, dtype=torch.int64),
        torch.zeros(2, 4, 4, 4, dtype=torch.bool),
    )
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0


def test_the_step_weights_the_unlabeled_term_by_lambda_u():
    from medssl.training.methods.fixmatch import fixmatch_step
    from medssl.training.threshold import FixedThreshold

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 1)
    batch = {
        "image": torch.randn(1, 1, 4, 4, 4),
        "label": torch.zeros(1, 4, 4, 4, dtype=torch.int64),
    }
    unl = {"image": torch.randn(1, 1, 4, 4, 4), "strong": torch.randn(1, 1, 4, 4, 4)}
    for lam in (0.0, 1.0, 2.5):
        cfg = SegmentationExperiment(
            method="fixmatch",
            fixmatch=FixMatchConfig(lambda_u=lam),
            threshold=ThresholdConfig(tau=0.5),
        )
        out = fixmatch_step(net, batch, unl, FixedThreshold(0.5), cfg)
        torch.testing.assert_close(out["loss"], out["sup"] + lam * out["u/ce"])
        assert out["u/kept"].item() == 1.0  # two classes: max p >= 0.5 everywhere


# -- crops ----------------------------------------------------------------------------------------


class _Array:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array


def test_weak_strong_crops_are_voxel_aligned():
    rng = np.random.default_rng(0)
    volumes = [
        LabeledVolume(_Array(rng.normal(size=(20, 32, 32)).astype(np.float32)), None)
        for _ in range(3)
    ]
    lookup = np.arange(256, dtype=np.uint8)
    svda = SVDA(n_ops=6, p=1.0)  # every op drawn, spatial ones included
    crops = SegCrops(volumes, (16, 16, 16), lookup, svda, -1.0, seed=0, stream=2, weak_strong=True)
    plain = SegCrops(volumes, (16, 16, 16), lookup, None, -1.0, seed=0, stream=2)
    for i in range(3):
        item = crops[i]
        assert set(item) == {"image", "strong"}
        draw = np.random.default_rng([0, 2, i])  # the dataset's draws: case, corner, then SVDA
        k, start = int(draw.integers(3)), [int(draw.integers(0, n - 16 + 1)) for n in (20, 32, 32)]
        window = volumes[k].image.array[
            start[0] : start[0] + 16, start[1] : start[1] + 16, start[2] : start[2] + 16
        ]
        np.testing.assert_array_equal(
            item["image"][0].numpy(), window
        )  # weak view: the crop as drawn
        np.testing.assert_array_equal(
            item["image"].numpy(), plain[i]["image"].numpy()
        )  # same draws
        assert not torch.equal(item["strong"], item["image"])
        # the strong view is the same draw's intensity ops (no rotation, no zoom) on the same crop
        draw_params = svda.sample(draw)
        assert {"rotation", "scale"} & set(draw_params.applied)  # the test does exercise the drop
        params = replace(draw_params, rotation_deg=None, scale=None)
        expected, _ = apply_svda(window, None, params, pad_value=-1.0)
        np.testing.assert_allclose(item["strong"][0].numpy(), expected, rtol=0, atol=0)
    assert "strong" not in plain[0]


def test_crops_carry_cpl_ids_that_follow_their_voxels_through_svda():
    """With a layout, ``ids`` are the crop's memory ids, moved by SVDA's rotation and zoom exactly
    as a label is: the same volume labelled with 1 + its voxel ids gives label - 1 == ids."""
    shape = (12, 20, 20)
    layout = VoxelMemoryLayout([shape], stride=1)
    grid = layout.crop_id_map(0, (0, 0, 0), shape).numpy()  # stride 1: every voxel's id
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    unlabeled = [LabeledVolume(_Array(image), None)]
    labeled = [LabeledVolume(_Array(image), _Array(grid + 1))]
    lookup = np.arange(grid.size + 1, dtype=np.int64)
    svda = SVDA(n_ops=6, p=1.0)
    crops = SegCrops(unlabeled, (8, 16, 16), lookup, svda, -1.0, seed=0, stream=2, layout=layout)
    twins = SegCrops(labeled, (8, 16, 16), lookup, svda, -1.0, seed=0, stream=2)
    moved = 0
    for i in range(4):
        ids, label = crops[i]["ids"], twins[i]["label"]
        assert ids.dtype == torch.int64 and ids.shape == (8, 16, 16)
        torch.testing.assert_close(crops[i]["image"], twins[i]["image"])
        torch.testing.assert_close(ids, label - 1, rtol=0, atol=0)
        assert (ids >= -1).all() and ids.max() < layout.n_samples
        moved += int((ids == -1).any())  # rotated/zoomed-out corners fall off the volume
    assert moved, "the draws should rotate or zoom some crop"
    weak = SegCrops(
        unlabeled,
        (8, 16, 16),
        lookup,
        svda,
        -1.0,
        seed=0,
        stream=2,
        weak_strong=True,
        layout=layout,
    )
    draw = np.random.default_rng([0, 2, 0])
    draw.integers(1)
    start = [int(draw.integers(0, n - p + 1)) for n, p in zip(shape, (8, 16, 16))]
    torch.testing.assert_close(
        weak[0]["ids"], layout.crop_id_map(0, start, (8, 16, 16))
    )  # weak view: not moved
    with pytest.raises(ValueError, match="unlabeled"):
        SegCrops(labeled, (8, 16, 16), lookup, svda, -1.0, seed=0, stream=2, layout=layout)


# -- end to end -----------------------------------------------------------------------------------


def test_fixmatch_cli_runs_and_logs_every_term_and_the_kept_fraction(organs, tmp_path):
    out = tmp_path / "fm"
    sets = [a for s in TINY for a in ("--set", s)]
    result = CliRunner().invoke(
        train,
        [
            "fixmatch",
            "--setting",
            "ssl",
            "--profile",
            "cpu",
            "--data",
            str(organs),
            "--out",
            str(out),
            "--device",
            "cpu",
            *sets,
        ],
    )
    assert result.exit_code == 0, result.output
    steps = [r for r in logged(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(
        {"sup", "u/ce", "u/kept", "u/lambda", "u/kept_share/0", "u/kept_share/1"} <= set(r)
        for r in steps
    )
    assert all(0.0 <= r["u/kept"] <= 1.0 for r in steps)
    assert not any(k.startswith("threshold/") for k in steps[0])
    state = checkpoint(out)
    assert state["config"]["method"] == "fixmatch" and state["method"]["threshold"] == {
        "policy": "fixed",
        "tau": 0.95,
    }
    assert "teacher" not in state["method"]
    assert (out / "test" / "metrics.json").is_file()


def test_flexmatch_logs_thresholds_and_checkpoints_its_memory(organs, tmp_path):
    cfg = tiny_config("flexmatch", "threshold.memory_stride=2")
    run = train_segmenter(cfg, organs, tmp_path / "flex", device="cpu")
    steps = [r for r in logged(run.out) if "loss" in r]
    assert all({"u/kept", "u/ce", "threshold/0", "threshold/1"} <= set(r) for r in steps)
    # warm-up: at t = 0 the memory is empty, every threshold is 0 and every voxel is kept
    assert (
        steps[0]["threshold/0"] == 0.0
        and steps[0]["threshold/1"] == 0.0
        and steps[0]["u/kept"] == 1.0
    )
    memory = checkpoint(run.out)["method"]["threshold"]
    assert memory["policy"] == "flexmatch" and memory["n_classes"] == 2
    n_unlabeled = checkpoint(run.out)["provenance"]["n_unlabeled"]
    assert n_unlabeled >= 1 and memory["n_samples"] > 0
    assert memory["memory"].shape == (memory["n_samples"],) and memory["memory"].dtype == torch.int8


def test_an_interrupted_flexmatch_run_resumes_to_the_same_weights_and_memory(
    organs, tmp_path, monkeypatch
):
    """4 straight steps == 2 steps, an interruption at step 3, then resume: model and CPL memory."""
    cfg = tiny_config("flexmatch", "threshold.memory_stride=2", "threshold.tau=0.6")
    train_segmenter(cfg, organs, tmp_path / "straight", device="cpu")

    train_interrupted_then_resumed(cfg, organs, tmp_path / "resumed", monkeypatch, "fixmatch_step")

    straight, resumed = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "resumed")
    assert resumed["step"] == 4
    assert (straight["method"]["threshold"]["memory"] >= 0).any(), (
        "tau 0.6 should fill some memory in 4 steps"
    )
    torch.testing.assert_close(
        resumed["method"]["threshold"]["memory"],
        straight["method"]["threshold"]["memory"],
        rtol=0,
        atol=0,
    )
    for name, value in straight["model"].items():
        torch.testing.assert_close(
            resumed["model"][name],
            value,
            rtol=0,
            atol=1e-6,
            msg=lambda m, name=name: f"{name} differs after resume: {m}",
        )
    resumed_steps = [r for r in logged(tmp_path / "resumed") if "loss" in r and r["step"] == 4]
    straight_steps = [r for r in logged(tmp_path / "straight") if "loss" in r and r["step"] == 4]
    assert resumed_steps[-1]["threshold/1"] == pytest.approx(straight_steps[-1]["threshold/1"])
