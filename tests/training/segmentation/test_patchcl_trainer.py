"""`medssl-train patchcl` and the issue-9 methods end to end: train, export, score; PatchCL's
warm-up, checkpointed head/queues, exact resume, and BatchNorm statistics left alone by the
patch embeddings."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner

from medssl.cli.train import train
from medssl.errors import ConfigError
from medssl.training.methods.patchcl import _embed
from medssl.training.networks.vnet import VNet
from medssl.training.segmentation.config import SegmentationExperiment, SegModelConfig
from medssl.training.segmentation.patchcl import ProjectionHead
from medssl.training.segmentation.trainer import train_segmenter
from tests.training.segmentation.helpers import (
    TINY,
    checkpoint,
    logged,
    tiny_config,
    train_interrupted_then_resumed,
    weights,
)

pytestmark = [pytest.mark.usefixtures("torch_one_thread"), pytest.mark.slow]

PATCHCL = ("data.patch=[16,32,32]", "patchcl.warmup_fraction=0.5")  # 2 warm-up steps of 4


@pytest.mark.parametrize("method", ["fixmatch", "flexmatch", "patchcl"])
def test_each_method_trains_exports_and_scores(method, organs, tmp_path):
    from medssl.export import ExportOptions, export_checkpoint
    from medssl.models.card import load_card
    from medssl.scoring import RunnerSpec, ScoreOptions, score

    out = tmp_path / method
    extra = (
        PATCHCL
        if method == "patchcl"
        else ("threshold.memory_stride=2",)
        if method == "flexmatch"
        else ()
    )
    sets = [a for s in [*TINY, *extra] for a in ("--set", s)]
    result = CliRunner().invoke(
        train,
        [
            method,
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
    metrics = json.loads((out / "test" / "metrics.json").read_text())
    exported = export_checkpoint(
        out, tmp_path / "repository", f"{method}-liver", ExportOptions(max_batch_size=2)
    )
    card = load_card(exported.model_dir)
    assert card.provenance["method"] == method and exported.parity.passed
    assert [label.name for label in card.labels] == ["liver"]
    summary = score(
        organs / "A",
        tmp_path / "scores",
        RunnerSpec(exported.repository, f"{method}-liver"),
        options=ScoreOptions(workers=0),
    )
    assert summary.counts == {"ok": 1}
    assert "1" in metrics["classes"]


def test_patchcl_warms_up_supervised_then_adds_the_teachers_pseudo_labels_at_full_weight(
    organs, tmp_path
):
    """The official train.py: a warm-up of Sup + PLGCL on labeled patches (no Reg: the teacher is
    still random), then Sup + β·Reg + γ·PLGCL with β at full weight (no ramp-up)."""
    cfg = tiny_config("patchcl", *PATCHCL)
    run = train_segmenter(cfg, organs, tmp_path / "pc", device="cpu")
    steps = {r["step"]: r for r in logged(run.out) if "loss" in r}
    for s in (1, 2):  # warm-up
        assert steps[s]["reg"] == 0 and steps[s]["reg/weight"] == 0 and "u/kept" not in steps[s]
        assert steps[s]["plgcl/patches"] > 0
        assert steps[s]["loss"] == pytest.approx(
            steps[s]["sup"] + 0.5 * steps[s]["plgcl"], rel=1e-5
        )
    for s in (3, 4):
        assert (
            steps[s]["reg/weight"] == cfg.patchcl.beta == 4.0
            and steps[s]["reg"] > 0
            and "u/kept" in steps[s]
        )
        assert steps[s]["plgcl/patches"] > 0 and steps[s]["plgcl"] > 0
        assert steps[s]["loss"] == pytest.approx(
            steps[s]["sup"] + 4.0 * steps[s]["reg"] + 0.5 * steps[s]["plgcl"], rel=1e-5
        )
    state = checkpoint(run.out)
    pc = state["method"]["patchcl"]
    assert set(pc) == {"head", "teacher_head", "queues"}
    # four PLGCL steps enqueued at most per_class (4) teacher embeddings per class each
    fill = pc["queues"]["fill"].tolist()
    assert len(fill) == 2 and 0 < fill[0] <= 16 and fill[1] <= 16
    head = ProjectionHead(16 * cfg.model.width, cfg.patchcl.hidden, cfg.patchcl.embedding_dim)
    head.load_state_dict(pc["head"])
    weight = next(k for k in pc["head"] if k.endswith("weight"))
    assert not torch.equal(pc["head"][weight], pc["teacher_head"][weight])  # EMA, not a copy
    assert state["method"]["teacher"] is not None
    VNet(cfg.model, 2).load_state_dict(state["model"])  # the exported network is the VNet alone


def test_an_interrupted_patchcl_run_resumes_to_the_same_weights_head_and_queues(
    organs, tmp_path, monkeypatch
):
    """Checkpoints every step; interrupted at step 4, so the resumed run restarts from queues that
    the PLGCL steps before it filled."""
    cfg = tiny_config("patchcl", *PATCHCL, "eval.every=1")
    train_segmenter(cfg, organs, tmp_path / "straight", device="cpu")
    train_interrupted_then_resumed(
        cfg, organs, tmp_path / "resumed", monkeypatch, "patchcl_step", at_call=4
    )
    straight, resumed = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "resumed")
    assert resumed["step"] == 4
    assert (
        checkpoint(tmp_path / "resumed", "step_00000003.pt")["method"]["patchcl"]["queues"][
            "fill"
        ].sum()
        > 0
    )
    for part in ("model", "teacher"):
        for name, value in weights(straight, part).items():
            torch.testing.assert_close(weights(resumed, part)[name], value, rtol=0, atol=1e-6)
    for part in ("head", "teacher_head"):
        for name, value in straight["method"]["patchcl"][part].items():
            torch.testing.assert_close(
                resumed["method"]["patchcl"][part][name], value, rtol=0, atol=1e-6
            )
    for name, value in straight["method"]["patchcl"]["queues"].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(
                resumed["method"]["patchcl"]["queues"][name], value, rtol=0, atol=1e-6
            )


def test_patch_embeddings_use_batch_statistics_but_leave_the_running_ones_alone():
    net = VNet(SegModelConfig(width=4), 2).train()
    head = ProjectionHead(64)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    before = [m.running_mean.clone() for m in norms]
    embedded = _embed(net, head, torch.rand(3, 1, 16, 16, 16))
    assert embedded.shape == (3, 128) and embedded.requires_grad
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    assert all(m.momentum == 0.1 for m in norms)  # restored
    net(torch.rand(2, 1, 16, 16, 16))  # a segmentation forward still updates them
    assert not all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"model": {"network": "unet2d"}}, "model.network"),
        ({"patchcl": {"patch": (32, 32, 32)}}, "patchcl.patch"),
    ],
)
def test_patchcl_config_errors_name_the_key(overrides, key):
    from medssl.config import config_from_dict

    values = {"method": "patchcl", "data": {"patch": [16, 32, 32]}, **overrides}
    with pytest.raises(ConfigError) as err:
        config_from_dict(SegmentationExperiment, values)
    assert err.value.key == key
