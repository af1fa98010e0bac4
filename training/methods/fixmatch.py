"""``fixmatch`` and ``flexmatch``: FixMatch for segmentation with a fixed threshold or
FlexMatch's curriculum pseudo-labelling (config sections ``fixmatch``,
:class:`~medssl.training.segmentation.config.FixMatchConfig`, and ``threshold``)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from medssl.training.methods.base import Batch, SegmentationMethod
from medssl.training.methods.common import (
    build_policy,
    filter_pseudo_labels,
    memory_ids,
    policy_state,
)
from medssl.training.segmentation.config import SegmentationExperiment
from medssl.training.segmentation.losses import supervised_loss, unlabeled_ce
from medssl.training.threshold import FlexMatchThreshold, ThresholdPolicy

__all__ = ["FixMatch", "fixmatch_step"]


def fixmatch_step(
    model: nn.Module,
    labeled: dict[str, torch.Tensor],
    unlabeled: dict[str, torch.Tensor],
    policy: ThresholdPolicy,
    cfg: SegmentationExperiment,
) -> dict[str, torch.Tensor]:
    """FixMatch (Sohn et al. 2020) for segmentation, with any :class:`ThresholdPolicy`:

    1. ``sup = DiceCE(model(x_l), y)``;
    2. weak view ``u`` (``unlabeled["image"]``) through the model without grad, ``p = softmax``;
       ``ŷ, keep = policy.pseudo_label(p, ids)`` (``unlabeled["ids"]``: the CPL memory ids of
       the crop's voxels, for FlexMatch);
    3. strong view (``unlabeled["strong"]``, voxel-aligned with ``u``):
       ``u_ce = CE(model(strong), ŷ)`` over kept voxels (:func:`unlabeled_ce`);
    4. ``loss = sup + λ_u·u_ce``.

    The labeled and strong crops share one forward (one DDP reduction per backward); the weak
    pass is a separate no-grad forward (in train mode, as FixMatch's single forward is).
    """
    fm = cfg.fixmatch
    n = labeled["image"].shape[0]
    with torch.no_grad():
        probs = torch.softmax(model(unlabeled["image"]).float(), dim=1)
    # the thresholds this batch is masked with (pseudo_label updates the memory afterwards)
    thresholds = policy.thresholds().float() if isinstance(policy, FlexMatchThreshold) else None
    pseudo, keep = filter_pseudo_labels(policy, probs, memory_ids(unlabeled, probs))
    logits = model(torch.cat([labeled["image"], unlabeled["strong"]])).float()
    sup = supervised_loss(logits[:n], labeled)
    u_ce = unlabeled_ce(logits[n:], pseudo, keep)
    out = {
        "loss": sup + fm.lambda_u * u_ce,
        "sup": sup,
        "u/ce": u_ce,
        "u/kept": keep.float().mean(),
        "u/lambda": torch.tensor(fm.lambda_u),
    }
    c = probs.shape[1]
    counts = torch.bincount(pseudo[keep].reshape(-1), minlength=c).float()
    total = max(float(keep.sum()), 1.0)
    out.update({f"u/kept_share/{k}": counts[k] / total for k in range(c)})  # kept voxels' classes
    if thresholds is not None:
        out.update({f"threshold/{k}": t for k, t in enumerate(thresholds)})
    return out


class FixMatch(SegmentationMethod):
    """FixMatch / FlexMatch: the model labels its own weak view; the policy is the method
    (checkpoint ``method.threshold``: the CPL memory for FlexMatch)."""

    strong_view: ClassVar[bool] = True

    def build(self, device: torch.device) -> None:
        super().build(device)
        policy = build_policy(self.cfg, self.data, device)
        assert policy is not None, "fixmatch and flexmatch always resolve a threshold policy"
        self.policy: ThresholdPolicy = policy

    def state_dict(self) -> dict[str, Any]:
        return policy_state(self.policy)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["threshold"])

    def step(self, step: int, batch: Batch) -> dict[str, torch.Tensor]:
        return fixmatch_step(self.model, batch.labeled, batch.unlabeled(), self.policy, self.cfg)
