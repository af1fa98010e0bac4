"""The slice-wise 2D UNet (``model.network: unet2d``): shapes, slice independence, SSL4MIS's
parameter count, the config rules, and a tiny run through train → export (ONNX parity) → score.

The reference architecture is the ``UNet`` of SSL4MIS ``code/networks/unet.py``
(HiLab-git/SSL4MIS); its parameter count is derived here by hand from that file's layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner

from medssl.cli.train import resolve_config, train
from medssl.config import load_config, parse_overrides
from medssl.errors import ConfigError
from medssl.io.nifti import read_nifti
from medssl.training.methods.mean_teacher import mean_teacher_step
from medssl.training.methods.supervised_seg import supervised_seg_step
from medssl.training.networks.segmenter import build_segmenter
from medssl.training.networks.unet2d import DROPOUT, UNet2D
from medssl.training.networks.vnet import VNet
from medssl.training.segmentation.config import SegmentationExperiment

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def experiment(*overrides: str, method: str = "mean-teacher") -> SegmentationExperiment:
    return load_config(
        SegmentationExperiment,
        resolve_config("seg-ssl-cpu"),
        {**parse_overrides(list(overrides)), "method": method},
    )


def tiny_net(n_classes: int = 3, seed: int = 0) -> UNet2D:
    torch.manual_seed(seed)
    return UNet2D(n_classes, width=4)


# ---------------------------------------------------------------- the network


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_logits_have_the_classes_on_the_input_grid_for_any_depth(depth):
    net = tiny_net().eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, depth, 32, 48))
    assert out.shape == (2, 3, depth, 32, 48)


def test_a_4d_input_runs_the_2d_network_and_equals_the_depth_1_path():
    net = tiny_net().eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        flat, deep = net(x), net(x[:, :, None])
    assert flat.shape == (3, 3, 32, 32)
    torch.testing.assert_close(deep[:, :, 0], flat)


def test_each_slice_is_segmented_on_its_own():
    """Eval mode: changing slice 2 changes slice 2's logits only; each slice's logits are the
    2D network's on that slice alone, whatever the batch holds."""
    net = tiny_net().eval()
    x = torch.randn(2, 1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[1, :, 2] = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = net(x), net(y)
        alone = net.forward_2d(y[1:2, :, 2])
    changed = (a - b).abs().amax(dim=(1, 3, 4))  # (batch, depth)
    assert changed[1, 2] > 1e-3
    changed[1, 2] = 0
    assert torch.all(changed == 0), "another slice's logits moved"
    torch.testing.assert_close(b[1:2, :, 2], alone)


def test_in_plane_edges_must_be_multiples_of_16_and_inputs_2d_or_3d():
    net = tiny_net().eval()
    with pytest.raises(ValueError, match="multiples of 16.*got 24x32"):
        net(torch.zeros(1, 1, 1, 24, 32))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        net(torch.zeros(1, 32, 32))


def _conv_block(a: int, b: int) -> int:
    """SSL4MIS ConvBlock(a, b): Conv2d(a, b, 3) + BN(b) + Conv2d(b, b, 3) + BN(b)."""
    return (9 * a * b + b) + 2 * b + (9 * b * b + b) + 2 * b


def ssl4mis_unet_parameters(
    in_chns: int, class_num: int, ft: tuple[int, ...] = (16, 32, 64, 128, 256)
) -> int:
    """Parameters of SSL4MIS's ``UNet(in_chns, class_num)`` (``bilinear: True``), layer by layer."""
    encoder = _conv_block(in_chns, ft[0]) + sum(_conv_block(ft[i - 1], ft[i]) for i in range(1, 5))
    # UpBlock(ft[i+1], ft[i], ft[i]): conv1x1 (ft[i+1] -> ft[i]) + ConvBlock(2 ft[i], ft[i])
    decoder = sum(ft[i + 1] * ft[i] + ft[i] + _conv_block(2 * ft[i], ft[i]) for i in range(4))
    out_conv = 9 * ft[0] * class_num + class_num
    return encoder + decoder + out_conv


@pytest.mark.parametrize("classes", [2, 4])
def test_parameter_count_is_ssl4mis_unet(classes):
    assert ssl4mis_unet_parameters(1, 4) == 1_813_764  # ACDC: 3 structures + background ("1.81M")
    net = UNet2D(classes)  # defaults: width 16, one channel, dropout on
    assert (
        sum(p.numel() for p in net.parameters())
        == ssl4mis_unet_parameters(1, classes)
        == 1_813_184 + 145 * classes
    )
    drops = [m.p for m in net.encoder.modules() if isinstance(m, torch.nn.Dropout)]
    assert tuple(drops) == DROPOUT == (0.05, 0.1, 0.2, 0.3, 0.5)
    assert not any(isinstance(m, torch.nn.Dropout) for m in net.decoder.modules())
    assert not any(
        isinstance(m, torch.nn.Dropout) for m in UNet2D(classes, dropout=False).modules()
    )
    assert (
        sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 18
    )  # two per ConvBlock
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in net.modules()) == 18


def test_the_segmentation_steps_train_every_parameter_of_the_unet():
    cfg = experiment(
        "model.network=unet2d", "model.width=4", "data.patch=[1,48,48]", "optim.steps=10"
    )
    student, teacher = build_segmenter(cfg, 2), build_segmenter(cfg, 2)
    assert isinstance(student, UNet2D)
    g = torch.Generator().manual_seed(0)
    labeled = {
        "image": torch.randn(2, 1, 1, 32, 32, generator=g),
        "label": torch.randint(0, 2, (2, 1, 32, 32), generator=g),
    }
    unlabeled = {"image": torch.randn(2, 1, 1, 32, 32, generator=g)}
    out = mean_teacher_step(student, teacher, labeled, unlabeled, 5, cfg, g)
    out["loss"].backward()
    assert all(p.grad is not None for p in student.parameters())
    sup = supervised_seg_step(tiny_net(2), labeled)
    assert torch.isfinite(sup["loss"])


def test_the_depth_fold_exports_to_onnx_with_a_dynamic_batch(tmp_path):
    """torch.export + ONNX of the (B, C, D, H, W) → (B·D, C, H, W) fold with D > 1: the batch
    stays symbolic, the rest static, and onnxruntime matches PyTorch for batches 1 and 2."""
    import onnxruntime as ort

    from medssl.export.models import SegmenterInference
    from medssl.export.onnx_export import export_onnx

    module = SegmenterInference(tiny_net(2)).eval()
    path = export_onnx(
        module,
        torch.randn(1, 1, 3, 32, 48),
        tmp_path / "model.onnx",
        input_name="patches",
        output_names=["probabilities"],
        max_batch_size=2,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].shape[1:] == [2, 3, 32, 48]
    assert not isinstance(session.get_outputs()[0].shape[0], int)
    for batch in (1, 2):
        x = torch.randn(batch, 1, 3, 32, 48, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = module(x).numpy()
        np.testing.assert_allclose(
            session.run(None, {"patches": x.numpy()})[0], expected, rtol=0, atol=1e-5
        )


# ---------------------------------------------------------------- config


def test_network_defaults_to_the_vnet():
    cfg = experiment(method="supervised-seg")
    assert cfg.model.network == "vnet" and isinstance(build_segmenter(cfg, 2), VNet)


def test_unet2d_with_ad_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"'model\.network'.*'unet2d'.*'ad'") as info:
        experiment("model.network=unet2d", "data.patch=[1,48,48]", method="ad")
    assert info.value.key == "model.network"
    with pytest.raises(
        ConfigError, match=r"'model\.network'.*must be one of 'vnet', 'unet2d'"
    ) as info:
        experiment("model.network=unet3d")
    assert info.value.key == "model.network"


def test_only_the_unet2d_takes_a_patch_depth_that_is_not_a_multiple_of_16():
    assert experiment("model.network=unet2d", "data.patch=[1,48,48]").data.patch == (1, 48, 48)
    assert experiment("model.network=unet2d", "data.patch=[3,48,48]").data.patch == (3, 48, 48)
    with pytest.raises(
        ConfigError, match=r"'data\.patch'.*VNet.*multiple of 16.*\[1, 48, 48\]"
    ) as info:
        experiment("data.patch=[1,48,48]")
    assert info.value.key == "data.patch"
    with pytest.raises(ConfigError, match="multiples of 16") as info:  # in-plane: both networks
        experiment("model.network=unet2d", "data.patch=[1,40,48]")
    assert info.value.key == "data"


@pytest.mark.parametrize("name", ["seg-ssl-2d", "seg-ssl-2d-cpu"])
def test_bundled_2d_configs_are_ssl4mis_unets_on_single_slices(name):
    cfg = load_config(SegmentationExperiment, resolve_config(name))
    assert cfg.model.network == "unet2d" and cfg.model.width == 16 and cfg.model.dropout
    assert cfg.data.patch[0] == 1 and cfg.method != "ad"
    with pytest.raises(ConfigError):
        load_config(SegmentationExperiment, resolve_config(name), {"method": "ad"})


# ---------------------------------------------------------------- train → export → score


@pytest.fixture(scope="module")
def organs(tmp_path_factory) -> Path:
    from medssl.synth.datasets import write_organ_dataset

    root = tmp_path_factory.mktemp("organs2d")
    write_organ_dataset(root / "A", cases=5, n_test=1, domain="A", seed=0, shape=(32, 48, 48))
    return root


@pytest.fixture(scope="module")
def run_2d(organs, tmp_path_factory) -> Path:
    """`medssl-train mean-teacher` with the 2D UNet on single-slice crops, 4 steps."""
    out = tmp_path_factory.mktemp("run2d") / "run"
    overrides = [
        "optim.steps=4",
        "eval.every=2",
        "data.workers=0",
        "model.width=8",
        f"data.cache_dir={organs / 'cache'}",
        "model.network=unet2d",
        "data.patch=[1,48,48]",
    ]
    result = CliRunner().invoke(
        train,
        [
            "mean-teacher",
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
            *[a for s in overrides for a in ("--set", s)],
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_a_mean_teacher_run_trains_the_unet2d_and_tests_on_the_source_grid(run_2d, organs):
    state = torch.load(run_2d / "checkpoints" / "last.pt", weights_only=False)
    assert state["config"]["model"]["network"] == "unet2d" and state["config"]["data"]["patch"] == [
        1,
        48,
        48,
    ]
    assert state["step"] == 4 and state["method"]["teacher"] is not None
    assert any(k.startswith("encoder.4.") for k in state["model"]) and not any(
        "stem" in k for k in state["model"]
    )
    assert any(
        k.endswith("weight") and v.ndim == 4 for k, v in state["model"].items()
    )  # 2D convolutions
    metrics = json.loads((run_2d / "test" / "metrics.json").read_text())
    assert set(metrics["classes"]["1"]) >= {"dice", "jaccard", "hd95_mm", "asd_mm"}
    source = read_nifti(organs / "A" / "imagesTs" / "organs_0005.nii.gz")
    predicted = read_nifti(run_2d / "test" / "predictions" / "A__organs_0005.nii.gz", label=True)
    assert predicted.shape == source.shape


def test_the_unet2d_exports_with_parity_and_scores_like_the_trainer(run_2d, organs, tmp_path):
    from medssl.export import ExportOptions, export_checkpoint
    from medssl.models.card import load_card
    from medssl.pipeline.preprocess import prepare
    from medssl.pipeline.segment import segment_preprocessed
    from medssl.runners import open_runner
    from medssl.scoring import RunnerSpec, ScoreOptions, score
    from medssl.training.networks.segmenter import inference_net
    from medssl.training.segmentation.eval import TorchSegmentationRunner

    exported = export_checkpoint(
        run_2d, tmp_path / "repo", "organs2d", ExportOptions(max_batch_size=2)
    )
    assert exported.parity.passed, exported.parity.summary()
    card = load_card(exported.model_dir)
    assert card.input.shape == (1, 1, 48, 48) and card.outputs[0].shape == (2, 1, 48, 48)
    assert card.provenance["network"] == "unet2d" and card.provenance["method"] == "mean-teacher"

    # The shared pipeline with the exported model equals it with the checkpoint's network, on
    # the probabilities (a 4-step network labels everything background, so labels alone say little).
    params = card.segmentation_params()
    prepared = prepare(read_nifti(organs / "A" / "imagesTs" / "organs_0005.nii.gz"), params)
    state = torch.load(run_2d / "checkpoints" / "best.pt", weights_only=False)
    runner = open_runner(exported.repository, "organs2d")
    try:
        onnx = segment_preprocessed(prepared, runner, params)
    finally:
        runner.close()
    ours = segment_preprocessed(prepared, TorchSegmentationRunner(inference_net(state)), params)
    assert onnx.shape == (2, *prepared.shape) and float(np.ptp(onnx[1])) > 1e-3
    np.testing.assert_allclose(onnx, ours, rtol=0, atol=1e-4)

    summary = score(
        organs / "A",
        tmp_path / "scores",
        RunnerSpec(exported.repository, "organs2d"),
        options=ScoreOptions(workers=0),
    )
    assert summary.counts == {"ok": 1}
    scored = read_nifti(tmp_path / "scores" / "labels" / "organs_0005.nii.gz", label=True).array
    trained = read_nifti(
        run_2d / "test" / "predictions" / "A__organs_0005.nii.gz", label=True
    ).array
    assert scored.shape == trained.shape
    assert (
        np.mean(scored == trained) > 0.999
    )  # onnxruntime vs torch: argmax ties aside, the same labels


def test_bcp_trains_the_unet2d_slice_wise(organs, tmp_path):
    """BCP with the 2D UNet (the official ACDC variant): both phases run on single slices."""
    out = tmp_path / "bcp2d"
    overrides = [
        "optim.steps=4",
        "eval.every=2",
        "data.workers=0",
        "model.width=8",
        "bcp.pretrain_steps=2",
        "bcp.lr_step=1",
        f"data.cache_dir={organs / 'cache'}",
        "model.network=unet2d",
        "data.patch=[1,48,48]",
    ]
    result = CliRunner().invoke(
        train,
        [
            "bcp",
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
            *[a for s in overrides for a in ("--set", s)],
        ],
    )
    assert result.exit_code == 0, result.output
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 4 and state["method"]["teacher"] is not None
    assert any(v.ndim == 4 for k, v in state["model"].items() if k.endswith("weight"))
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("in/loss" in row for row in logged) and any("pretrain/dice" in row for row in logged)
