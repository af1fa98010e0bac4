"""``mean-teacher``: the mean-teacher baseline (config section ``mean_teacher``,
:class:`~medssl.training.segmentation.config.MeanTeacherConfig`; ``threshold.policy`` masks its
consistency)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from medssl.training.methods.base import Batch, TeacherMethod
from medssl.training.methods.common import (
    build_policy,
    filter_pseudo_labels,
    memory_ids,
    policy_state,
    rampup,
)
from medssl.training.segmentation.config import SegmentationExperiment
from medssl.training.segmentation.losses import supervised_loss
from medssl.training.threshold import ThresholdPolicy

__all__ = ["MeanTeacher", "mean_teacher_step"]


def mean_teacher_step(
    model: nn.Module,
    teacher: nn.Module,
    labeled: dict[str, torch.Tensor],
    unlabeled: dict[str, torch.Tensor],
    step: int,
    cfg: SegmentationExperiment,
    generator: torch.Generator | None = None,
    policy: ThresholdPolicy | None = None,
) -> dict[str, torch.Tensor]:
    """Mean teacher (Tarvainen & Valpola 2017) as SSL4MIS ``train_mean_teacher_3D.py``:
    supervised Dice + CE on labeled crops, plus w(t)·MSE(softmax(student(x)),
    softmax(teacher(x + noise))) over labeled and unlabeled crops.

    With a ``policy`` (``threshold.policy``) the MSE is averaged over the voxels the policy keeps
    on the teacher's probabilities only (confidence-masked consistency, French et al. 2018);
    labeled crops are thresholded too but are not CPL memory samples (ids ``-1``).
    """
    mt = cfg.mean_teacher
    x = torch.cat([labeled["image"], unlabeled["image"]])
    n = labeled["image"].shape[0]
    logits = model(x).float()
    sup = supervised_loss(logits[:n], labeled)
    noise = (torch.randn(x.shape, generator=generator) * mt.noise_std).clamp(
        -mt.noise_clip, mt.noise_clip
    )
    with torch.no_grad():
        target = torch.softmax(teacher(x + noise.to(x.device)).float(), dim=1)
    out: dict[str, torch.Tensor] = {}
    if policy is None:
        consistency = F.mse_loss(torch.softmax(logits, dim=1), target)
    else:
        ids = memory_ids(unlabeled, target)
        if ids is not None:
            ids = torch.cat([torch.full_like(labeled["label"], -1), ids])
        _, keep = filter_pseudo_labels(policy, target, ids)
        squared = (torch.softmax(logits, dim=1) - target).pow(2).mean(dim=1)
        kept = keep.to(squared.dtype)
        consistency = (squared * kept).sum() / kept.sum().clamp_min(1.0)
        out["u/kept"] = kept[n:].mean()
    weight = mt.consistency * rampup(step, cfg.optim.steps, mt.rampup_fraction)
    return {
        "loss": sup + weight * consistency,
        "sup": sup,
        "consistency": consistency,
        "weight": torch.tensor(weight),
        **out,
    }


class MeanTeacher(TeacherMethod):
    """Mean teacher: student + EMA teacher (``mean_teacher.ema``), optional pseudo-label policy
    (checkpoint ``method``: ``teacher``, ``threshold``)."""

    @property
    def ema(self) -> float:
        return self.cfg.mean_teacher.ema

    def build(self, device: torch.device) -> None:
        super().build(device)
        self.policy = build_policy(self.cfg, self.data, device)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **policy_state(self.policy)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.policy is not None:
            self.policy.load_state_dict(state["threshold"])

    def step(self, step: int, batch: Batch) -> dict[str, torch.Tensor]:
        return mean_teacher_step(
            self.model,
            self.teacher,
            batch.labeled,
            batch.unlabeled(),
            step,
            self.cfg,
            batch.generator,
            self.policy,
        )
