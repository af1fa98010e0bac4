"""``focalmix``: FocalMix (paper §3, §4.1; config section ``focalmix``,
:class:`~medssl.training.detection.config.FocalMixConfig`; the mixing, target guessing and CPL
object selection are :mod:`medssl.training.detection.focalmix`).

The step returns the loss terms; the loop does backward, clipping and the optimiser.
Batches come from :mod:`medssl.training.detection.data`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from medssl.detection import CUBE_GROUP, AnchorGrid, CubeSymmetry
from medssl.errors import MedsslError
from medssl.training.detection.config import DetectionExperiment
from medssl.training.detection.focalmix import (
    CPLObjectSelection,
    apply_symmetry,
    guess_targets,
    image_mixup,
    object_mixup,
    objects_from_mask,
    objects_from_targets,
    sample_lambda,
    transform_anchor_targets,
)
from medssl.training.detection.losses import FocalConfig, detection_loss, positive_count
from medssl.training.detection.mining import NoduleTruth
from medssl.training.distributed import all_gather_cat
from medssl.training.methods.base import Batch, DetectionMethod
from medssl.training.networks.detector import flatten_levels

__all__ = ["FocalMix", "focalmix_step", "joint_loss", "unlabeled_weight"]


def unlabeled_weight(step: int, cfg: DetectionExperiment) -> float:
    """The unlabeled-loss weight at ``step``: linear ramp-up to ``focalmix.unlabeled_weight``."""
    fm = cfg.focalmix
    ramp = fm.rampup_fraction * cfg.optim.steps
    return fm.unlabeled_weight * (1.0 if ramp <= 0 else min(1.0, step / ramp))


def joint_loss(
    outputs: torch.Tensor,
    labeled_targets: torch.Tensor,
    deltas: torch.Tensor,
    box_mask: torch.Tensor,
    unlabeled_targets: torch.Tensor,
    weight: float,
    config: FocalConfig,
) -> dict[str, torch.Tensor]:
    """FocalMix's loss of one mixed batch: labeled SFL + box loss + ``weight`` × unlabeled SFL.

    Both objectness sums are divided by **one** normaliser, the number of anchors with target
    >= 0.5 over the whole mixed batch (at least 1): RetinaNet normalises a batch's focal loss by
    its positives, and MixMatch trains the labeled and unlabeled halves as one batch. Each half
    normalised by its own positives (the unlabeled half usually has none, so its sum was divided
    by 1) weighted an unlabeled anchor up to ~#positives times a labeled one, differently at
    every step (issue 18). The box loss (labeled half only; guessed targets carry no boxes)
    keeps its own normaliser, the anchors with a box target.

    Args:
        outputs: ``(B_l + B_u, N, 5)`` network outputs, labeled rows first.
        labeled_targets: ``(B_l, N)`` mixed labeled targets (-1 ignored).
        deltas, box_mask: ``(B_l, N, 4)`` and ``(B_l, N)`` the labeled box targets.
        unlabeled_targets: ``(B_u, N)`` mixed guessed targets.
        weight: the unlabeled weight at this step (:func:`unlabeled_weight`).

    Returns:
        ``{"loss", "cls", "box", "unlabeled", "normaliser"}``: ``cls`` and ``unlabeled`` are
        the two objectness terms (unweighted), each already divided by ``normaliser``.
    """
    n = labeled_targets.shape[0]
    if outputs.shape[0] != n + unlabeled_targets.shape[0]:
        raise ValueError(
            f"outputs has {outputs.shape[0]} rows, targets {n} + {unlabeled_targets.shape[0]}"
        )
    count = positive_count(labeled_targets, unlabeled_targets)
    labeled = detection_loss(
        outputs[:n], labeled_targets, deltas, box_mask, config, normaliser=count
    )
    no_boxes = torch.zeros_like(unlabeled_targets, dtype=torch.bool)
    unlabeled = detection_loss(
        outputs[n:],
        unlabeled_targets,
        torch.zeros_like(outputs[n:, :, 1:]),
        no_boxes,
        config,
        normaliser=count,
    )["cls"]
    return {
        "loss": labeled["loss"] + weight * unlabeled,
        "cls": labeled["cls"],
        "box": labeled["box"],
        "unlabeled": unlabeled,
        "normaliser": count,
    }


def _boxes(batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
    boxes, counts = batch["boxes"].cpu().numpy(), batch["n_boxes"].cpu().numpy()
    return [b[:n] for b, n in zip(boxes, counts)]


def _pseudo_precision(
    found: list[np.ndarray],
    elements: list[CubeSymmetry],
    unlabeled: dict[str, torch.Tensor],
    truth: NoduleTruth,
    shape: tuple[int, ...],
) -> dict[str, torch.Tensor]:
    """Guessed objects (cubes in the augmented crops' frames) mapped back to their scans and
    checked against the hidden truth."""
    centres: dict[int, list[np.ndarray]] = {}
    cases, starts = unlabeled["case"].cpu().numpy(), unlabeled["start"].cpu().numpy()
    for boxes, g, case, start in zip(found, elements, cases, starts):
        back = g.inverse().apply_points(boxes[:, :3], shape) + start
        centres.setdefault(int(case), []).append(back)
    hits, total = truth.precision({c: np.concatenate(v) for c, v in centres.items()})
    stats = {"pseudo_objects": torch.tensor(float(total))}
    if total:
        stats["pseudo_precision"] = torch.tensor(hits / total)
    return stats


def focalmix_step(
    model: nn.Module,
    raw_model: nn.Module,
    batch: dict[str, torch.Tensor],
    unlabeled: dict[str, torch.Tensor],
    grid: AnchorGrid,
    step: int,
    cfg: DetectionExperiment,
    rng: np.random.Generator,
    objects: CPLObjectSelection | None = None,
    truth: NoduleTruth | None = None,
) -> dict[str, torch.Tensor]:
    """One FocalMix step: guess, augment, MixUp (image then object level), SFL.

    Args:
        model: the (possibly DDP-wrapped) detector to train.
        raw_model: the same network unwrapped, for the no-grad target guessing.
        batch: labeled batch (images already augmented by the dataset).
        unlabeled: unlabeled batch ``{"image": (B, 1, P, P, P)}``; with ``objects`` also
            ``"case" (B,)`` and ``"start" (B, 3)``, each crop's scan index and corner.
        grid: anchors of a training patch.
        step: the step number (for the ramp-up).
        rng: this step's random generator.
        objects: CPL object selection (``focalmix.object_policy: flexmatch``), updated in
            place; None: FocalMix's fixed ``object_threshold``.
        truth: the unlabeled scans' hidden nodules, for diagnostics only (needs ``"case"`` and
            ``"start"``): adds ``"pseudo_objects"`` (guessed objects of this batch on scans
            with a known truth) and, when there are any, ``"pseudo_precision"`` (their share
            lying on a true nodule). Nothing trained depends on it.

    Returns:
        ``{"loss", "cls", "box", "unlabeled", "normaliser", "weight", "guessed_positives"}``
        (:func:`joint_loss`), with object
        MixUp also ``"objects"`` (mean unlabeled objects per patch) and, with CPL,
        ``"cpl_threshold"`` (T(nodule) this batch was selected with) and
        ``"cpl_nodule_cells"`` / ``"cpl_background_cells"`` (σ after the update).
    """
    fm = cfg.focalmix
    if (objects is None) != (fm.object_policy == "fixed"):
        raise ValueError(
            f"focalmix.object_policy is {fm.object_policy!r}: pass a CPLObjectSelection "
            "exactly when it is 'flexmatch'"
        )
    x, y = batch["image"], batch["labels"]
    u = unlabeled["image"]
    n = x.shape[0]
    elements = [CUBE_GROUP[i] for i in rng.choice(len(CUBE_GROUP), size=fm.k, replace=False)]
    sharp, mean = guess_targets(raw_model, u, elements, fm.temperature)
    guessed = mean  # in the crops' own frame, which their "start" corners refer to
    # MixMatch trains on augmented unlabeled data; the guessed targets follow the transform.
    g_u = [CUBE_GROUP[i] for i in rng.integers(len(CUBE_GROUP), size=u.shape[0])]
    u = torch.stack([apply_symmetry(g, u[b]) for b, g in enumerate(g_u)])
    sharp = torch.cat(
        [transform_anchor_targets(g, sharp[b : b + 1], grid) for b, g in enumerate(g_u)]
    )
    mean = torch.cat(
        [transform_anchor_targets(g, mean[b : b + 1], grid) for b, g in enumerate(g_u)]
    )

    images, targets = torch.cat([x, u]), torch.cat([y, sharp])
    x_mix, y_mix, u_mix, t_mix = x, y, u, sharp
    if fm.image_mixup:
        lam = sample_lambda(fm.eta, rng)
        perm = torch.from_numpy(rng.permutation(len(images))).to(x.device)
        x_mix, y_mix = image_mixup(x, y, images[perm[:n]], targets[perm[:n]], lam)
        u_mix, t_mix = image_mixup(u, sharp, images[perm[n:]], targets[perm[n:]], lam)
    mixed = torch.cat([x_mix, u_mix])
    stats: dict[str, torch.Tensor] = {}
    if fm.object_mixup:
        if objects is None:
            found = objects_from_targets(mean, grid, fm.object_threshold)
        else:
            stats["cpl_threshold"] = torch.tensor(objects.nodule_threshold())
            found = objects_from_mask(mean, objects.select(mean), grid)
            # every rank writes every rank's batch, so the CPL memories stay identical under DDP
            objects.update(
                all_gather_cat(guessed),
                grid,
                all_gather_cat(unlabeled["case"]),
                all_gather_cat(unlabeled["start"]),
            )
            background, nodule = objects.learning_effect()
            stats["cpl_nodule_cells"] = torch.tensor(nodule)
            stats["cpl_background_cells"] = torch.tensor(background)
        stats["objects"] = torch.tensor(float(np.mean([len(f) for f in found])))
        boxes = _boxes(batch) + found
        # λ̃ >= 0.5: a mixed image's objects are those of its dominant (first) source.
        mixed = object_mixup(mixed, boxes, images, boxes, fm.eta, rng)

    if truth is not None:
        if not fm.object_mixup:
            found = objects_from_targets(mean, grid, fm.object_threshold)
        stats.update(_pseudo_precision(found, g_u, unlabeled, truth, tuple(u.shape[2:])))

    out = flatten_levels(model(mixed)).float()
    weight = unlabeled_weight(step, cfg)
    losses = joint_loss(out, y_mix, batch["deltas"], y == 1, t_mix, weight, cfg.loss)
    return {
        **losses,
        "weight": torch.tensor(weight),
        # Diagnostic: guessed positive anchors per unlabeled patch (a collapse shows here first).
        "guessed_positives": (sharp >= 0.5).sum(dim=1).float().mean(),
        **stats,
    }


class FocalMix(DetectionMethod):
    """FocalMix on the FPN detector; with ``focalmix.object_policy: flexmatch`` the CPL memory
    of the object choice (keyed by cells of the unlabeled scans' cached volumes) is checkpointed
    (``method.threshold``), so a resumed run continues with the same memory and thresholds."""

    def build(self, device: torch.device) -> None:
        super().build(device)
        fm = self.cfg.focalmix
        self.objects = (
            CPLObjectSelection(
                [v.array.shape for v in self.data.unlabeled],
                tau=fm.object_threshold,
                memory_stride=fm.object_memory_stride,
            )
            if fm.object_policy == "flexmatch"
            else None
        )

    def state_dict(self) -> dict[str, Any]:
        return {} if self.objects is None else {"threshold": self.objects.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.objects is None:
            return
        if state.get("threshold") is None:
            raise MedsslError(
                "the last checkpoint has no CPL memory (written with focalmix.object_policy "
                "fixed?); resume with the run's own config"
            )
        self.objects.load_state_dict(state["threshold"])

    def step(self, step: int, batch: Batch) -> dict[str, torch.Tensor]:
        assert batch.rng is not None
        return focalmix_step(
            self.model,
            self.network,
            batch.labeled,
            batch.unlabeled(),
            self.data.grid,
            step,
            self.cfg,
            batch.rng,
            self.objects,
            self.data.truth,
        )
