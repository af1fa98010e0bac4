"""``patchcl``: PatchCL (Basak & Yin, CVPR 2023) on the mean teacher (config section
``patchcl``, :class:`~medssl.training.segmentation.config.PatchCLConfig`; the patch sampling,
queues and PLGCL loss are :mod:`medssl.training.segmentation.patchcl`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from medssl.training.batchnorm import batch_statistics_only
from medssl.training.distributed import DistEnv, all_gather_cat, unwrap, wrap_ddp
from medssl.training.methods.base import Batch, TeacherMethod, ema_update
from medssl.training.methods.common import (
    build_policy,
    filter_pseudo_labels,
    memory_ids,
    policy_state,
)
from medssl.training.segmentation.config import SegmentationExperiment
from medssl.training.segmentation.losses import supervised_loss, unlabeled_ce
from medssl.training.segmentation.patchcl import (
    EmbeddingQueues,
    ProjectionHead,
    attended_patches,
    plgcl_loss,
    sample_class_patches,
)
from medssl.training.threshold import ThresholdPolicy

__all__ = ["PatchCL", "PatchCLParts", "patchcl_step"]


@dataclass
class PatchCLParts:
    """PatchCL's state beside the student and teacher networks: the student projection head
    (possibly DDP-wrapped), the teacher's (an EMA of the student's, like the teacher network) and
    the per-class queues of teacher embeddings."""

    head: nn.Module
    teacher_head: nn.Module
    queues: EmbeddingQueues


def _embed(net: nn.Module, head: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    # the attended patches (mostly zeros outside their class) must not move the statistics
    # the segmenter is tested with
    with batch_statistics_only(net):
        return head(unwrap(net).encode(patches).float())


def patchcl_step(
    model: nn.Module,
    teacher: nn.Module,
    parts: PatchCLParts,
    labeled: dict[str, torch.Tensor],
    unlabeled: dict[str, torch.Tensor],
    step: int,
    cfg: SegmentationExperiment,
    policy: ThresholdPolicy | None = None,
) -> dict[str, torch.Tensor]:
    """PatchCL (Basak & Yin, CVPR 2023) on the mean-teacher trainer, eq. 8::

        warm-up (step < patchcl.warmup_fraction · steps):  L = Sup + γ·PLGCL(labeled patches)
        then:                                               L = Sup + β·Reg + γ·PLGCL

    as the official ``train.py`` runs it: a supervised warm-up whose contrastive loss sees the
    labeled crops only (ground truth), then the SSL phase with the consistency term at full
    weight (no ramp-up: ``4*consistency_loss``) on the teacher's pseudo-labels.

    1. SSL phase: teacher on the weak view ``unlabeled["image"]`` (no grad): ``p_T``;
       pseudo-labels ``argmax p_T``, or ``threshold.policy``'s labels and keep mask;
    2. one student forward of the labeled crops (and, in the SSL phase, the strong view):
       ``Sup = DiceCE(·, y)``, ``Reg = CE(student(strong), pseudo)`` over kept voxels (eq. 7,
       :func:`unlabeled_ce`);
    3. with γ > 0: class-aware patch sampling (§3.1) over labeled crops (ground truth one-hot as
       ``C^k``) and, in the SSL phase, weak unlabeled crops (``p_T``; rejected voxels count
       for no class), intensities mapped from the normalised ``[-1, 1]`` to ``[0, 1]`` for the
       entropy; the attended patches through the student encoder + head (grad) and the
       teacher's (no grad, enqueued first, as the official ``train.py``); PLGCL (eq. 6) against
       the queues' class statistics, ζ = ``patchcl.zeta`` or the official
       ``queue_length / classes in the batch``.

    The teacher network and head are EMA-updated (``patchcl.ema``) after the optimiser step, in
    the trainer.
    """
    pc = cfg.patchcl
    n = labeled["image"].shape[0]
    warm = step < round(pc.warmup_fraction * cfg.optim.steps)
    n_classes = unwrap(model).n_classes
    if warm:
        logits = model(labeled["image"]).float()
        sup = supervised_loss(logits, labeled)
        loss = sup
        out = {"sup": sup, "reg": logits.new_zeros(()), "reg/weight": torch.tensor(0.0)}
        image01 = ((labeled["image"].float() + 1) / 2).clamp(0, 1)
        confidence = F.one_hot(labeled["label"], n_classes).movedim(-1, 1).float()
        labels = labeled["label"]
    else:
        with torch.no_grad():
            probs = torch.softmax(teacher(unlabeled["image"]).float(), dim=1)
        if policy is None:
            pseudo = probs.argmax(dim=1)
            keep = torch.ones_like(pseudo, dtype=torch.bool)
        else:
            pseudo, keep = filter_pseudo_labels(policy, probs, memory_ids(unlabeled, probs))
        logits = model(torch.cat([labeled["image"], unlabeled["strong"]])).float()
        sup = supervised_loss(logits[:n], labeled)
        reg = unlabeled_ce(logits[n:], pseudo, keep)
        loss = sup + pc.beta * reg
        out = {
            "sup": sup,
            "reg": reg,
            "reg/weight": torch.tensor(pc.beta),
            "u/kept": keep.float().mean(),
        }
        image01 = ((torch.cat([labeled["image"], unlabeled["image"]]).float() + 1) / 2).clamp(0, 1)
        confidence = torch.cat(
            [F.one_hot(labeled["label"], n_classes).movedim(-1, 1).float(), probs]
        )
        labels = torch.cat([labeled["label"], pseudo.masked_fill(~keep, -1)])
    if pc.gamma > 0:
        selection = sample_class_patches(
            image01, confidence, labels, pc.patch, pc.stride, pc.per_class, pc.min_voxels
        )
        contrastive = logits.new_zeros(())
        if len(selection):
            patches = attended_patches(image01, confidence, selection, pc.patch)
            student = _embed(model, parts.head, patches)
            with (
                torch.no_grad()
            ):  # every rank's teacher embeddings (MoCo-style), same queues everywhere
                keys = _embed(teacher, parts.teacher_head, patches)
                parts.queues.enqueue(all_gather_cat(keys), all_gather_cat(selection.cls))
            means, covariances, present = parts.queues.statistics()
            zeta = pc.zeta or pc.queue_length / len(torch.unique(selection.cls))
            contrastive = plgcl_loss(
                student, selection.cls, means, covariances, present, pc.tau, pc.lam, zeta
            )
        loss = loss + pc.gamma * contrastive
        out.update({"plgcl": contrastive, "plgcl/patches": torch.tensor(float(len(selection)))})
    return {"loss": loss, **out}


class PatchCL(TeacherMethod):
    """PatchCL: the mean teacher (``patchcl.ema``) plus a projection head, its EMA twin and the
    embedding queues (checkpoint ``method``: ``teacher``, ``threshold``, ``patchcl``); the
    exported network is the VNet alone."""

    strong_view: ClassVar[bool] = True

    @property
    def ema(self) -> float:
        return self.cfg.patchcl.ema

    def build(self, device: torch.device) -> None:
        super().build(device)
        self.policy = build_policy(self.cfg, self.data, device)
        pc = self.cfg.patchcl
        head = ProjectionHead(16 * self.cfg.model.width, pc.hidden, pc.embedding_dim).to(device)
        queues = EmbeddingQueues(
            self.data.n_classes, pc.embedding_dim, pc.queue_length, device=device
        )
        self.parts = PatchCLParts(head, copy.deepcopy(head), queues)

    def parameters(self) -> list[nn.Parameter]:
        return [*super().parameters(), *unwrap(self.parts.head).parameters()]

    def state_dict(self) -> dict[str, Any]:
        parts = self.parts
        return {
            **super().state_dict(),
            **policy_state(self.policy),
            "patchcl": {
                "head": unwrap(parts.head).state_dict(),
                "teacher_head": parts.teacher_head.state_dict(),
                "queues": parts.queues.state_dict(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.policy is not None:
            self.policy.load_state_dict(state["threshold"])
        self.parts.head.load_state_dict(state["patchcl"]["head"])
        self.parts.teacher_head.load_state_dict(state["patchcl"]["teacher_head"])
        self.parts.queues.load_state_dict(state["patchcl"]["queues"])

    def start(self, env: DistEnv, resumed: bool) -> None:
        super().start(env, resumed)
        self.parts.head = wrap_ddp(self.parts.head, env)
        for p in self.parts.teacher_head.parameters():
            p.requires_grad_(False)

    def step(self, step: int, batch: Batch) -> dict[str, torch.Tensor]:
        return patchcl_step(
            self.model,
            self.teacher,
            self.parts,
            batch.labeled,
            batch.unlabeled(),
            step,
            self.cfg,
            self.policy,
        )

    def after_step(self, step: int) -> None:
        super().after_step(step)
        ema_update(self.parts.teacher_head, unwrap(self.parts.head), self.ema)
