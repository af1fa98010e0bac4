"""The threshold policy as a pseudo-label filter inside mean teacher and BCP (issue 9):
``threshold.policy``, the masked consistency, the masked mix losses, and short runs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from medssl.errors import ConfigError
from medssl.training.methods.bcp import bcp_self_train_step
from medssl.training.methods.mean_teacher import mean_teacher_step
from medssl.training.segmentation.bcp import mix_loss
from medssl.training.segmentation.config import BCPConfig, SegmentationExperiment, ThresholdConfig
from medssl.training.segmentation.trainer import train_segmenter
from medssl.training.threshold import FixedThreshold
from tests.training.segmentation.helpers import checkpoint, logged, tiny_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class _Fixed(torch.nn.Module):
    """A 'network' that returns the same logits whatever the input (a teacher with known output)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: x.shape[0]] * self.scale


# -- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "policy", "resolved"),
    [
        ("fixmatch", "auto", "fixed"),
        ("flexmatch", "auto", "flexmatch"),
        ("mean-teacher", "auto", "none"),
        ("bcp", "auto", "none"),
        ("mean-teacher", "flexmatch", "flexmatch"),
        ("bcp", "fixed", "fixed"),
        ("fixmatch", "fixed", "fixed"),
        ("ad", "none", "none"),
    ],
)
def test_auto_resolves_to_each_methods_published_policy(method, policy, resolved):
    cfg = SegmentationExperiment(
        method=method, threshold=ThresholdConfig(policy=policy), bcp=BCPConfig(pretrain_steps=10)
    )
    assert cfg.pseudo_label_policy == resolved


@pytest.mark.parametrize(
    ("method", "policy", "match"),
    [
        ("fixmatch", "flexmatch", "use method flexmatch"),
        ("flexmatch", "fixed", "use method fixmatch"),
        ("flexmatch", "none", "is the 'flexmatch' policy"),
        ("ad", "fixed", "has no pseudo-label filter"),
        ("supervised-seg", "flexmatch", "has no pseudo-label filter"),
    ],
)
def test_a_policy_that_contradicts_the_method_is_a_config_error_naming_the_key(
    method, policy, match
):
    with pytest.raises(ConfigError, match=match) as err:
        SegmentationExperiment(method=method, threshold=ThresholdConfig(policy=policy))
    assert err.value.key == "threshold.policy"


# -- mean teacher ----------------------------------------------------------------------------------


def _mt_batch():
    g = torch.Generator().manual_seed(0)
    labeled = {
        "image": torch.randn(1, 1, 2, 2, 2, generator=g),
        "label": torch.zeros(1, 2, 2, 2, dtype=torch.int64),
    }
    unlabeled = {"image": torch.randn(1, 1, 2, 2, 2, generator=g)}
    teacher_logits = torch.randn(2, 3, 2, 2, 2, generator=g) * 3
    student_logits = torch.randn(2, 3, 2, 2, 2, generator=g)
    return labeled, unlabeled, _Fixed(teacher_logits), _Fixed(student_logits)


def test_mean_teacher_consistency_is_averaged_over_the_kept_voxels_only():
    labeled, unlabeled, teacher, student = _mt_batch()
    cfg = SegmentationExperiment(method="mean-teacher")
    tau = 0.8
    out = mean_teacher_step(
        student, teacher, labeled, unlabeled, 10, cfg, policy=FixedThreshold(tau)
    )
    p_t, p_s = teacher.logits.softmax(1), student.logits.softmax(1)
    keep = p_t.max(1).values >= tau
    assert 0 < keep.sum() < keep.numel(), "the example must keep some voxels and drop others"
    expected = (p_s - p_t).pow(2).mean(1)[keep].mean()
    torch.testing.assert_close(out["consistency"], expected)
    torch.testing.assert_close(out["u/kept"], keep[1].float().mean())
    # a policy that keeps everything is the plain mean teacher
    plain = mean_teacher_step(student, teacher, labeled, unlabeled, 10, cfg)
    everything = mean_teacher_step(
        student, teacher, labeled, unlabeled, 10, cfg, policy=FixedThreshold(1e-6)
    )
    torch.testing.assert_close(everything["consistency"], plain["consistency"])


# -- BCP -------------------------------------------------------------------------------------------


def test_mix_loss_with_valid_drops_the_rejected_voxels_and_equals_the_official_when_all_are_valid():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, 4, generator=g)
    target = torch.randint(0, 3, (2, 4, 4, 4), generator=g)
    mask = torch.ones(4, 4, 4, dtype=torch.bool)
    mask[1:3, 1:3, 1:3] = False
    official = mix_loss(logits, target, mask, 1.0, 0.5)
    everything = mix_loss(
        logits, target, mask, 1.0, 0.5, valid=torch.ones(2, 4, 4, 4, dtype=torch.bool)
    )
    torch.testing.assert_close(everything["loss"], official["loss"])
    valid = torch.ones(2, 4, 4, 4, dtype=torch.bool)
    valid[:, 1:3, 1:3, 1:3] = False  # every pasted voxel rejected: only the outside region is left
    only_outside = mix_loss(logits, target, mask, 1.0, 0.5, valid=valid)
    outside_alone = mix_loss(logits, target, mask, 1.0, 0.0)
    torch.testing.assert_close(only_outside["ce"], outside_alone["ce"])
    # Dice over an empty region is 1 − (s / s) = 0 per sample and class, so it adds 0
    torch.testing.assert_close(only_outside["dice"], outside_alone["dice"])
    assert not torch.allclose(only_outside["loss"], official["loss"])


def _bcp_batch(n_classes: int):
    g = torch.Generator().manual_seed(2)
    labeled = {
        "image": torch.randn(2, 1, 6, 6, 6, generator=g),
        "label": torch.randint(0, n_classes, (2, 6, 6, 6), generator=g),
    }
    unlabeled = {"image": torch.randn(2, 1, 6, 6, 6, generator=g)}
    return labeled, unlabeled, _Fixed(torch.randn(2, n_classes, 6, 6, 6, generator=g) * 2)


def test_bcp_keeping_everything_is_official_bcp_and_rejecting_all_leaves_ground_truth():
    labeled, unlabeled, teacher = _bcp_batch(3)
    student = _Fixed(torch.randn(4, 3, 6, 6, 6, generator=torch.Generator().manual_seed(3)))
    cfg = SegmentationExperiment(method="bcp", bcp=BCPConfig(pretrain_steps=1, largest_cc=False))

    def run(policy):
        return bcp_self_train_step(
            student, teacher, labeled, unlabeled, cfg, torch.Generator().manual_seed(4), policy
        )

    official, everything, nothing = run(None), run(FixedThreshold(1e-6)), run(FixedThreshold(1.0))
    torch.testing.assert_close(everything["loss"], official["loss"])  # 3 classes: argmax either way
    assert everything["u/kept"].item() == 1.0 and nothing["u/kept"].item() == 0.0
    # nothing kept: the pseudo-labelled region (inside of the in-mix, outside of the out-mix) is
    # gone
    torch.testing.assert_close(
        nothing["in/loss"], run_ground_truth_only(student, labeled, unlabeled, teacher, cfg)[0]
    )
    assert not torch.allclose(nothing["loss"], official["loss"])


def run_ground_truth_only(student, labeled, unlabeled, teacher, cfg):
    """The in-mix loss when the pseudo-labelled box weighs 0: ``mix_loss`` with α = 0."""
    cfg0 = SegmentationExperiment(
        method="bcp", bcp=BCPConfig(pretrain_steps=1, largest_cc=False, u_weight=0.0)
    )
    out = bcp_self_train_step(
        student, teacher, labeled, unlabeled, cfg0, torch.Generator().manual_seed(4)
    )
    return out["in/loss"], out["out/loss"]


# -- end to end ------------------------------------------------------------------------------------


def test_mean_teacher_with_cpl_filters_logs_and_checkpoints_its_memory(organs, tmp_path):
    cfg = tiny_config("mean-teacher", "threshold.policy=flexmatch", "threshold.memory_stride=2")
    run = train_segmenter(cfg, organs, tmp_path / "mt", device="cpu")
    steps = [r for r in logged(run.out) if "loss" in r]
    assert all("u/kept" in r and 0.0 <= r["u/kept"] <= 1.0 for r in steps)
    assert steps[0]["u/kept"] == 1.0  # CPL warm-up: every threshold 0 at t = 0
    state = checkpoint(run.out)
    assert (
        state["method"]["threshold"]["policy"] == "flexmatch"
        and state["method"]["threshold"]["n_samples"] > 0
    )
    assert state["method"]["teacher"] is not None


def test_bcp_with_a_fixed_threshold_runs_and_checkpoints_its_policy(organs, tmp_path):
    cfg = tiny_config(
        "bcp",
        "threshold.policy=fixed",
        "threshold.tau=0.6",
        "bcp.pretrain_steps=2",
        "data.patch=[16,32,32]",
    )  # B/2 = 1 mixed crop: BatchNorm needs > 1 value
    run = train_segmenter(cfg, organs, tmp_path / "bcp", device="cpu")
    steps = [r for r in logged(run.out) if "loss" in r]
    assert "u/kept" not in steps[1] and all(
        "u/kept" in r for r in steps[2:]
    )  # pre-training has no pseudo-labels
    assert checkpoint(run.out)["method"]["threshold"] == {"policy": "fixed", "tau": 0.6}
