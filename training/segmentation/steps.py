"""One optimisation step of each segmentation method: supervised, mean teacher, A&D, BCP,
FixMatch/FlexMatch, PatchCL.

Each returns its loss terms; the trainer does backward and the optimiser. Batches come from
:class:`medssl.training.segmentation.data.SegCrops`: ``image (B, 1, Z, Y, X)``, ``label (B, Z, Y, X)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from medssl.training.batchnorm import batch_statistics_only
from medssl.training.distributed import all_gather_cat, unwrap
from medssl.training.networks.diffusion import LabelDiffusion, label_to_x0
from medssl.training.networks.vnet import DiffVNet
from medssl.training.segmentation.bcp import (
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
from medssl.training.segmentation.drs import DifficultyWeights
from medssl.training.segmentation.losses import dice_ce_loss
from medssl.training.segmentation.patchcl import (
    EmbeddingQueues,
    attended_patches,
    plgcl_loss,
    sample_class_patches,
)
from medssl.training.threshold import FlexMatchThreshold, ThresholdPolicy

__all__ = [
    "PatchCLParts",
    "ad_step",
    "bcp_pretrain_step",
    "bcp_self_train_step",
    "ema_update",
    "filter_pseudo_labels",
    "fixmatch_step",
    "gaussian_smooth",
    "mean_teacher_step",
    "patchcl_step",
    "rampup",
    "supervised_seg_step",
    "unlabeled_ce",
]


def rampup(step: int, total_steps: int, fraction: float) -> float:
    """Sigmoid-shaped ramp-up exp(−5(1 − t)²), t = step / (fraction·total) clipped to 1
    (Laine & Aila 2017; the official ``sigmoid_rampup``)."""
    length = fraction * total_steps
    if length <= 0:
        return 1.0
    phase = 1.0 - min(step, length) / length
    return math.exp(-5.0 * phase * phase)


def supervised_loss(logits: torch.Tensor, labeled: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every method's loss on labeled crops: Dice + CE against ``labeled["label"]``, the CE
    weighted by ``labeled["ce_weights"]`` when the trainer adds them (``loss.class_weighting``)."""
    return dice_ce_loss(logits, labeled["label"], ce_weights=labeled.get("ce_weights"))


def supervised_seg_step(
    model: nn.Module, labeled: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Dice + CE on the labeled crops."""
    loss = supervised_loss(model(labeled["image"]).float(), labeled)
    return {"loss": loss, "sup": loss}


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher ← decay·teacher + (1 − decay)·student, over parameters only (SSL4MIS
    ``update_ema_variables``): the teacher runs in train mode, so its BatchNorm uses batch
    statistics and keeps its own running statistics."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)


def _ids(unlabeled: dict[str, torch.Tensor], probs: torch.Tensor) -> torch.Tensor | None:
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
        ids = _ids(unlabeled, target)
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


def gaussian_smooth(probabilities: torch.Tensor, sigma: float = 1.0, size: int = 3) -> torch.Tensor:
    """Per-channel ``size³`` Gaussian (normalised to sum 1), ``padding="same"`` with zeros
    (official ``GaussianSmoothing(num_cls, 3, 1)``). ``(B, C, Z, Y, X)`` → same shape."""
    r = torch.arange(size, dtype=torch.float32, device=probabilities.device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    kernel = g[:, None, None] * g[None, :, None] * g[None, None, :]
    kernel = (kernel / kernel.sum()).to(probabilities.dtype)
    c = probabilities.shape[1]
    weight = kernel.expand(c, 1, size, size, size).contiguous()
    return F.conv3d(probabilities, weight, padding=size // 2, groups=c)


def _gumbel_softmax(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``F.gumbel_softmax(logits, tau=1, dim=1)`` (soft), with the noise drawn from ``generator``
    so the step's random stream stays in one place: softmax(logits − log(−log U)), U ~ U(0, 1)."""
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-20, 1.0).to(logits.device)
    return torch.softmax(logits - torch.log(-torch.log(u)), dim=1)


@torch.no_grad()
def _pseudo_label(
    raw: DiffVNet,
    image: torch.Tensor,
    diffusion: LabelDiffusion,
    rs: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """ŷ = argmax(p_ξ + p_ψ) on unlabeled crops ``(B, 1, Z, Y, X)`` → ``(B, Z, Y, X)``.

    p_ξ: the 10-step DDIM x̂0 (or D_ξ's logits without diffusion), then with RS
    GaussianSmooth(GumbelSoftmax_τ=1(·)), without RS softmax(·); p_ψ = softmax(D_ψ).
    Official ``train_diffusion.py`` (``ddim_sample``, ``gumbel_softmax``, ``GaussianSmoothing``).
    """
    if raw.time_mlp is not None:
        shape = (image.shape[0], raw.n_classes, *image.shape[2:])
        xi = diffusion.ddim_x0(
            lambda x_t, t: raw.denoise(x_t, t, image), shape, image.device, generator
        )
    else:
        xi = raw.denoise(None, None, image)
    xi = xi.float()
    p_xi = gaussian_smooth(_gumbel_softmax(xi, generator)) if rs else torch.softmax(xi, dim=1)
    p_psi = torch.softmax(raw.psi(image).float(), dim=1)
    return torch.argmax(p_xi + p_psi, dim=1)


def ad_step(
    model: nn.Module,
    raw: DiffVNet,
    labeled: dict[str, torch.Tensor],
    unlabeled: dict[str, torch.Tensor],
    drs: DifficultyWeights | None,
    step: int,
    cfg: SegmentationExperiment,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One A&D step (official ``train_diffusion.py``):

    1. θ ← 0.99·θ + 0.01·(ξ + ψ)/2;
    2. L_deno = DiceCE(D_ξ(x_l, x_t, t), y) with x_t = q_sample(one_hot(y)·2 − 1, t);
    3. L_diff = DiceCE(D_ψ(x_l), y) weighted per class by DRS (from D_ξ's hard Dice);
    4. ŷ = argmax(p_ξ + p_ψ) on x_u (no grad), L_u = DiceCE(D_θ(x_u), ŷ);
    5. L = L_deno + L_diff + μ·L_u, μ = w_u·exp(−5(1 − e/E)²).

    Args:
        model: the (possibly DDP-wrapped) :class:`DiffVNet`; ``raw`` is the same unwrapped.
        drs: the re-weighting state, or ``None`` for uniform weights ("w/o DRS").
    """
    ad = cfg.ad
    raw.average_into_theta(ad.ema)
    x, y, u = labeled["image"], labeled["label"], unlabeled["image"]
    x_t = t = None
    if raw.time_mlp is not None:
        diffusion = ad.diffusion_process
        t = diffusion.sample_t(x.shape[0], generator, x.device)
        noise = torch.randn(x.shape[:1] + (raw.n_classes,) + x.shape[2:], generator=generator).to(
            x.device
        )
        x_t = diffusion.q_sample(label_to_x0(y, raw.n_classes), t, noise)
    pseudo = _pseudo_label(raw, u, ad.diffusion_process, ad.rs, generator)
    p_xi, p_psi, p_theta = model(x, x_t=x_t, t=t, unlabeled=u)
    deno = supervised_loss(p_xi.float(), labeled)
    weights = drs.update(p_xi.detach().float(), y) if drs is not None else None
    diff = dice_ce_loss(p_psi.float(), y, weights)
    unsup = dice_ce_loss(p_theta.float(), pseudo)
    mu = ad.mu * rampup(step, cfg.optim.steps, ad.rampup_fraction)
    out = {
        "loss": deno + diff + mu * unsup,
        "deno": deno,
        "diff": diff,
        "unsup": unsup,
        "mu": torch.tensor(mu),
    }
    if weights is not None:
        out.update({f"drs/{c}": w for c, w in enumerate(weights.detach().cpu())})
    return out


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
            pseudo, keep = filter_pseudo_labels(policy, probs, _ids(unlabeled, probs))
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


def unlabeled_ce(logits: torch.Tensor, pseudo: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """FixMatch's unlabeled term for segmentation: cross-entropy of the strong view's ``logits
    (B, C, *S)`` against ``pseudo (B, *S)``, averaged over the kept voxels ``keep (B, *S)`` only;
    0 (still attached to the graph) when none is kept. (FixMatch averages over the whole batch
    with the mask as a weight; over voxels of a 3D crop that would let the kept fraction,
    mostly background early on, scale the term, so the mean is over kept voxels.)"""
    ce = F.cross_entropy(logits.float(), pseudo, reduction="none")
    kept = keep.to(ce.dtype)
    return (ce * kept).sum() / kept.sum().clamp_min(1.0)


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
    pseudo, keep = filter_pseudo_labels(policy, probs, _ids(unlabeled, probs))
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
    weight (no ramp-up: ``4*consistency_loss``) on the teacher's pseudo-labels. Before this
    change Reg applied β to a random teacher's argmax from step 0 (issue 19).

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
            pseudo, keep = filter_pseudo_labels(policy, probs, _ids(unlabeled, probs))
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
