"""What several segmentation methods share: the consistency ramp-up, the pseudo-label policy
(``threshold:``) and its filter."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from medssl.training.distributed import all_gather_cat
from medssl.training.threshold import FixedThreshold, FlexMatchThreshold, ThresholdPolicy

if TYPE_CHECKING:
    from medssl.training.methods.base import SegmentationData
    from medssl.training.segmentation.config import SegmentationExperiment

__all__ = ["build_policy", "filter_pseudo_labels", "memory_ids", "policy_state", "rampup"]


def rampup(step: int, total_steps: int, fraction: float) -> float:
    """Sigmoid-shaped ramp-up exp(−5(1 − t)²), t = step / (fraction·total) clipped to 1
    (Laine & Aila 2017; the official ``sigmoid_rampup``)."""
    length = fraction * total_steps
    if length <= 0:
        return 1.0
    phase = 1.0 - min(step, length) / length
    return math.exp(-5.0 * phase * phase)


def build_policy(
    cfg: SegmentationExperiment, data: SegmentationData, device: torch.device
) -> ThresholdPolicy | None:
    """``threshold.policy`` resolved for ``cfg.method`` (:attr:`SegmentationExperiment.
    pseudo_label_policy`): a fixed threshold, FlexMatch's CPL over ``data.layout``'s voxel
    memory, or None (every voxel, argmax)."""
    th = cfg.threshold
    if cfg.pseudo_label_policy == "fixed":
        return FixedThreshold(th.tau)
    if cfg.pseudo_label_policy == "flexmatch":
        assert data.layout is not None, "the task builds the CPL memory layout for flexmatch"
        return FlexMatchThreshold(
            data.n_classes,
            data.layout.n_samples,
            tau=th.tau,
            warmup=th.warmup,
            mapping=th.mapping,
            device=device,
        )
    return None


def policy_state(policy: ThresholdPolicy | None) -> dict[str, object]:
    """``{"threshold": policy state}``, or nothing without a policy (checkpoint ``method``)."""
    return {} if policy is None else {"threshold": policy.state_dict()}


def memory_ids(unlabeled: dict[str, torch.Tensor], probs: torch.Tensor) -> torch.Tensor | None:
    """The CPL memory ids of the unlabeled crops (``SegCrops(layout=...)``), else None."""
    ids = unlabeled.get("ids")
    return ids.to(probs.device) if ids is not None else None


def filter_pseudo_labels(
    policy: ThresholdPolicy, probs: torch.Tensor, ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``policy.pseudo_label`` on the teacher's ``probs (B, C, *S)`` with memory ``ids (B, *S)``
    (None for a fixed threshold): ``(labels, keep)``, both ``(B, *S)`` on ``probs``' device.

    Masked with this rank's batch; under DDP the memory is then updated with every rank's batch
    (:func:`all_gather_cat`), so all ranks keep the same CPL memory and thresholds.
    """
    labels, keep = policy.mask(probs, ids)
    if ids is None:
        policy.update(probs, ids)
    else:
        policy.update(all_gather_cat(probs), all_gather_cat(ids))
    return labels.to(probs.device), keep.to(probs.device)
