"""``bcp``: Bidirectional Copy-Paste (config section ``bcp``,
:class:`~medssl.training.segmentation.config.BCPConfig`; the masks and mix losses are
:mod:`medssl.training.segmentation.bcp`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from medssl.training.methods.base import Batch, Scheduler, TeacherMethod
from medssl.training.methods.common import (
    build_policy,
    filter_pseudo_labels,
    memory_ids,
    policy_state,
)
from medssl.training.segmentation.bcp import (
    BCPPhases,
    bidirectional_mix,
    box_mask,
    copy_paste,
    keep_largest_components,
    masked_dice_loss,
    mix_loss,
    pseudo_labels,
    sample_box,
)
from medssl.training.segmentation.config import SegmentationExperiment
from medssl.training.threshold import ThresholdPolicy

__all__ = ["BCP", "bcp_pretrain_step", "bcp_self_train_step"]


def _bcp_mask(
    image: torch.Tensor, cfg: SegmentationExperiment, generator: torch.Generator | None
) -> torch.Tensor:
    """One iteration's copy-paste mask for crops ``image (B, 1, *spatial)``: bool ``spatial``."""
    spatial = image.shape[2:]
    box = sample_box(
        spatial, cfg.bcp.mask_ratio, generator, whole_depth=cfg.model.network == "unet2d"
    )
    return box_mask(spatial, box, image.device)


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0] // 2
    return x[:n], x[n : 2 * n]


def bcp_pretrain_step(
    model: nn.Module,
    labeled: dict[str, torch.Tensor],
    cfg: SegmentationExperiment,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """BCP pre-training (official ``LA_BCP_train.py`` ``pre_train``): the labeled crops' two
    halves ``a, b`` (``B/2`` each) copy-pasted, ``a·M + b·(1 − M)`` for images and labels, and
    ``(CE + Dice) / 2`` with ``mask_DiceLoss`` over the whole crop; the CE takes
    ``labeled["ce_weights"]`` when given (``loss.class_weighting``; the self-training's mix
    losses stay the official unweighted ones)."""
    (image_a, image_b), (label_a, label_b) = _halves(labeled["image"]), _halves(labeled["label"])
    mask = _bcp_mask(image_a, cfg, generator)
    target = copy_paste(label_a, label_b, mask)
    logits = model(copy_paste(image_a, image_b, mask)).float()
    dice = masked_dice_loss(logits, target)
    ce = F.cross_entropy(logits, target, weight=labeled.get("ce_weights"))
    return {"loss": (dice + ce) / 2, "pretrain/dice": dice, "pretrain/ce": ce}


def bcp_self_train_step(
    model: nn.Module,
    teacher: nn.Module,
    labeled: dict[str, torch.Tensor],
    unlabeled: dict[str, torch.Tensor],
    cfg: SegmentationExperiment,
    generator: torch.Generator | None = None,
    policy: ThresholdPolicy | None = None,
) -> dict[str, torch.Tensor]:
    """BCP self-training (official ``LA_BCP_train.py`` ``self_train``).

    1. The teacher's pseudo-labels on the unlabeled crops (no grad; threshold 0.5 or argmax,
       then the largest connected component per class);
    2. one box mask ``M`` for both mixes: ``in = x_a·M + u_a·(1 − M)``,
       ``out = u_b·M + x_b·(1 − M)``, targets mixed alike from ground truth and pseudo-labels;
    3. ``loss = mix_loss(in; GT 1, pseudo α) + mix_loss(out; pseudo α, GT 1)``.

    With a ``policy`` (``threshold.policy``) step 1 takes the policy's labels (argmax) and keep
    mask instead of BCP's cut, then the largest components; rejected pseudo-labelled voxels
    weigh 0 in the mix losses (``mix_loss(valid=...)``).

    The EMA update of the teacher follows the optimiser step, in the trainer. Choice: the
    student sees both mixes in one forward (the official runs two) and the teacher the
    unlabeled crops in one (the official: each half), so DDP's one-reduction-per-backward
    contract holds; in train mode BatchNorm then normalises over ``B`` crops, not ``B/2``.
    """
    b = cfg.bcp
    valid_in = valid_out = None
    with torch.no_grad():
        teacher_logits = teacher(unlabeled["image"])
        if policy is None:
            pseudo = pseudo_labels(teacher_logits, b.pseudo_threshold, b.largest_cc)
        else:
            probs = teacher_logits.float().softmax(dim=1)
            pseudo, keep = filter_pseudo_labels(policy, probs, memory_ids(unlabeled, probs))
            if b.largest_cc:
                pseudo = keep_largest_components(pseudo, probs.shape[1])
    (image_a, image_b), (label_a, label_b) = _halves(labeled["image"]), _halves(labeled["label"])
    (unl_a, unl_b), (pseudo_a, pseudo_b) = _halves(unlabeled["image"]), _halves(pseudo)
    mask = _bcp_mask(image_a, cfg, generator)
    image_in, image_out = bidirectional_mix(image_a, image_b, unl_a, unl_b, mask)
    target_in, target_out = bidirectional_mix(label_a, label_b, pseudo_a, pseudo_b, mask)
    if policy is not None:
        truth = torch.ones_like(label_a, dtype=torch.bool)
        valid_in, valid_out = bidirectional_mix(truth, truth, *_halves(keep), mask)
    logits_in, logits_out = model(torch.cat([image_in, image_out])).float().split(image_in.shape[0])
    loss_in = mix_loss(
        logits_in, target_in, mask, outside_weight=1.0, inside_weight=b.u_weight, valid=valid_in
    )
    loss_out = mix_loss(
        logits_out, target_out, mask, outside_weight=b.u_weight, inside_weight=1.0, valid=valid_out
    )
    out = {
        "loss": loss_in["loss"] + loss_out["loss"],
        **{f"in/{k}": v for k, v in loss_in.items()},
        **{f"out/{k}": v for k, v in loss_out.items()},
    }
    if policy is not None:
        out["u/kept"] = keep.float().mean()
    return out


class BCP(TeacherMethod):
    """BCP in two phases (:class:`BCPPhases`): copy-paste pre-training on labeled pairs, then
    self-training from the best pre-trained weights with the EMA teacher (``bcp.ema``, not
    updated while pre-training); plain SGD at ``bcp.lr`` with the phases' step schedule.
    Pre-training validations are logged and checkpointed as ``pretrain_*`` (so ``best.pt`` is
    always a self-trained student), the last pre-training step is always validated, and no
    unlabeled crop is drawn before self-training (checkpoint ``method``: ``teacher``, ``bcp``,
    ``threshold``)."""

    @property
    def ema(self) -> float:
        return self.cfg.bcp.ema

    def build(self, device: torch.device) -> None:
        super().build(device)
        self.phases = BCPPhases(self.cfg.bcp)
        self.policy = build_policy(self.cfg, self.data, device)

    def optimiser(self) -> tuple[torch.optim.Optimizer, Scheduler]:
        """Official ``LA_BCP_train.py``: SGD without Nesterov, :meth:`BCPPhases.lr_factor`."""
        b = self.cfg.bcp
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=b.lr,
            momentum=self.cfg.optim.momentum,
            weight_decay=b.weight_decay,
        )
        factor = self.phases.lr_factor
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factor(s))

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "bcp": self.phases.state_dict(),
            **policy_state(self.policy),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.phases.load_state_dict(state["bcp"])
        if self.policy is not None:
            self.policy.load_state_dict(state["threshold"])

    def unlabeled_start(self, start: int) -> int:
        return max(start, self.phases.pretrain_steps)

    def before_step(self, step: int) -> None:
        if step == self.phases.pretrain_steps:
            assert self.optimizer is not None
            self.phases.start_self_training(self.network, self.teacher, self.optimizer)

    def step(self, step: int, batch: Batch) -> dict[str, torch.Tensor]:
        if self.phases.pretraining(step):
            return bcp_pretrain_step(self.model, batch.labeled, self.cfg, batch.generator)
        return bcp_self_train_step(
            self.model,
            self.teacher,
            batch.labeled,
            batch.unlabeled(),
            self.cfg,
            batch.generator,
            self.policy,
        )

    def after_step(self, step: int) -> None:
        if not self.phases.pretraining(step):
            super().after_step(step)

    def evaluation_due(self, done: int) -> bool:
        return done == self.phases.pretrain_steps

    def on_validation(self, done: int, metrics: dict[str, float] | None) -> dict[str, float] | None:
        if not self.phases.pretraining(done - 1):
            return metrics
        if metrics is not None:
            metrics = {f"pretrain_{k}": v for k, v in metrics.items()}
        self.phases.observe_pretrained(
            done, self.network, metrics["pretrain_dice"] if metrics else None
        )
        return metrics
