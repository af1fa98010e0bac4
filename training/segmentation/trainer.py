"""The segmentation trainer behind ``medssl-train ad``, ``supervised-seg``, ``mean-teacher``,
``bcp``, ``fixmatch``, ``flexmatch`` and ``patchcl``.

A run folder holds ``config.yaml``, ``split.json``, ``checkpoints/`` (periodic, ``last.pt``,
``best.pt`` by validation Dice), ``tensorboard/``, ``log.jsonl`` and, at the end, ``test/``
(``metrics.json``, ``cases.json``, ``predictions/*.nii.gz``) from the best checkpoint on the
test domains. Conventions as the detector trainer (:mod:`medssl.training.detection.trainer`):
typed config, checkpoints with RNG state for an exact resume, DDP, cached volumes.

Validation (checkpoint choice) uses only the held-out labeled-pool cases (``data.n_validation``),
never the test set. BCP runs in two phases (:class:`~medssl.training.segmentation.bcp.BCPPhases`):
pre-training checkpoints record ``pretrain_dice`` (so ``best.pt`` is always a self-trained
student) and carry the best pre-trained weights, from which self-training starts.
FixMatch/FlexMatch (:func:`~medssl.training.segmentation.steps.fixmatch_step`) draw weak + strong views of
the unlabeled crops. The pseudo-label policy (``threshold:``; fixed or CPL, also as a filter in
mean teacher and BCP) is built here; CPL's memory is keyed by a voxel grid over the unlabeled
cases' cached volumes (:class:`~medssl.training.threshold.VoxelMemoryLayout`,
``threshold.memory_stride``; the crops carry their voxels' ids) and saved in the checkpoints
(``threshold``), so a resumed run continues with the same thresholds. PatchCL
(:func:`~medssl.training.segmentation.steps.patchcl_step`) is the mean teacher plus a projection head, its
EMA twin and the embedding queues, all in the checkpoints (``patchcl``); the exported network is
the VNet alone.
"""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medssl.config import config_to_dict, dump_config
from medssl.errors import MedsslError
from medssl.training.cache import VolumeCache, default_cache_dir
from medssl.training.checkpoint import CheckpointManager, resume_from_last, rng_state
from medssl.training.distributed import DistEnv, cleanup, init_distributed, unwrap, wrap_ddp
from medssl.training.logger import TrainLogger
from medssl.training.loop import TrainingDivergedError
from medssl.training.networks.segmenter import build_segmenter, inference_net
from medssl.training.seed import seed_everything
from medssl.training.segmentation.bcp import BCPPhases
from medssl.training.segmentation.config import SegmentationExperiment
from medssl.training.segmentation.data import (
    LabeledVolume,
    SegCrops,
    cache_case,
    class_names,
    label_lookup,
    split_domains,
)
from medssl.training.segmentation.drs import DifficultyWeights
from medssl.training.segmentation.eval import (
    normalisation,
    segmentation_params,
    test_segmenter,
    validate_segmenter,
)
from medssl.training.segmentation.losses import frequency_weights
from medssl.training.segmentation.patchcl import EmbeddingQueues, ProjectionHead
from medssl.training.segmentation.steps import (
    PatchCLParts,
    ad_step,
    bcp_pretrain_step,
    bcp_self_train_step,
    ema_update,
    fixmatch_step,
    mean_teacher_step,
    patchcl_step,
    supervised_seg_step,
)
from medssl.training.segmentation.svda import SVDA
from medssl.training.streams import batch_stream, to_device
from medssl.training.threshold import (
    FixedThreshold,
    FlexMatchThreshold,
    ThresholdPolicy,
    VoxelMemoryLayout,
)

__all__ = ["SegmentationRun", "train_segmenter"]

CHECKPOINT_KIND = "medssl.segmenter"


@dataclass(frozen=True)
class SegmentationRun:
    """What a finished run produced."""

    out: Path
    best_checkpoint: Path
    test_report: dict[str, Any] | None


def class_weights(
    cfg: SegmentationExperiment, labeled: list[LabeledVolume], lookup: np.ndarray, n_classes: int
) -> torch.Tensor | None:
    """``loss.class_weighting``'s CE weights ``(n_classes,)`` from the labeled volumes' voxel
    counts on the model grid, or None for ``"none"``."""
    if cfg.loss.class_weighting == "none":
        return None
    counts = np.zeros(n_classes, dtype=np.int64)
    for volume in labeled:
        assert volume.label is not None
        counts += np.bincount(lookup[np.asarray(volume.label.array)].ravel(), minlength=n_classes)[
            :n_classes
        ]
    return frequency_weights(counts, cfg.loss.weight_power)


def _poly(step: int, total: int, power: float) -> float:
    return (1 - step / total) ** power


def _optimiser(
    cfg: SegmentationExperiment,
    model: nn.Module,
    phases: BCPPhases | None,
    head: nn.Module | None = None,
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD and its schedule: Nesterov and the poly lr (official A&D ``train_diffusion.py``), or for
    BCP plain SGD at ``bcp.lr`` / ``bcp.weight_decay`` with :meth:`BCPPhases.lr_factor`
    (official ``LA_BCP_train.py``). PatchCL's projection ``head`` trains with the network."""
    o = cfg.optim
    params = [*model.parameters(), *(head.parameters() if head is not None else ())]
    if phases is not None:
        optimizer = torch.optim.SGD(
            params, lr=cfg.bcp.lr, momentum=o.momentum, weight_decay=cfg.bcp.weight_decay
        )
        factor = phases.lr_factor
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factor(s))
    optimizer = torch.optim.SGD(
        params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _poly(s, o.steps, o.poly_power)
    )


def train_segmenter(
    cfg: SegmentationExperiment,
    data: str | Path,
    out: str | Path,
    resume: bool = False,
    device: str | None = None,
) -> SegmentationRun:
    """Train (or resume) a segmentation run and test it on the test domains.

    Args:
        cfg: the validated experiment; ``cfg.method`` picks the step, ``cfg.data`` the setting.
        data: a folder of per-domain Decathlon datasets (or one dataset: domain ``"."``).
        out: the run folder.
        resume: continue from ``out/checkpoints/last.pt``.
        device: ``"cpu"``, ``"cuda"``...; default: the DDP rank's GPU, else CPU.

    Raises:
        TrainingDivergedError: the loss became NaN/inf (the last good checkpoint stays).
        MedsslError: a bad data layout, no unlabeled cases for an SSL method, or ``resume``
            without a checkpoint.
    """
    env = init_distributed(prefer_cuda=device != "cpu")
    dev = torch.device(device) if device else env.device
    try:
        return _train(cfg, Path(data), Path(out), resume, env, dev)
    finally:
        cleanup()


def _train(
    cfg: SegmentationExperiment,
    data: Path,
    out: Path,
    resume: bool,
    env: DistEnv,
    dev: torch.device,
) -> SegmentationRun:
    semi = cfg.method != "supervised-seg"
    seed_everything(cfg.seed + env.rank)
    d = cfg.data
    split = split_domains(data, d)
    if semi and not split.unlabeled:
        raise MedsslError(
            f"{cfg.method} needs unlabeled cases: lower data.labeled_fraction or add "
            "data.unlabeled_domains"
        )
    names = class_names(split, d)
    n_classes = len(names)
    lookup = label_lookup(split, d)
    manager = CheckpointManager(out, metric="dice")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
        (out / "split.json").write_text(json.dumps(split.to_json(), indent=2) + "\n")
    norm = normalisation(d)
    cache = VolumeCache(
        Path(d.cache_dir) if d.cache_dir else default_cache_dir(), d.spacing_mm, norm
    )
    labeled = [cache_case(cache, c, True) for c in split.labeled]
    unlabeled = [cache_case(cache, c, False) for c in split.unlabeled] if semi else []
    validation = [cache_case(cache, c, True) for c in split.validation]
    provenance = {
        "method": cfg.method,
        "setting": cfg.setting,
        "data": str(data.resolve()),
        "domains": list(d.domains),
        "unlabeled_domains": list(d.unlabeled_domains),
        "test_domains": list(d.tested_on),
        "n_labeled": len(labeled),
        "n_unlabeled": len(unlabeled),
        "n_validation": len(validation),
        "n_test": len(split.test),
    }
    ce_weights = class_weights(cfg, labeled, lookup, n_classes)
    if ce_weights is not None:
        provenance["ce_weights"] = [round(float(w), 4) for w in ce_weights]

    model = build_segmenter(cfg, n_classes).to(dev)
    teacher = (
        build_segmenter(cfg, n_classes).to(dev)
        if cfg.method in ("mean-teacher", "bcp", "patchcl")
        else None
    )
    ema = {"bcp": cfg.bcp.ema, "patchcl": cfg.patchcl.ema}.get(cfg.method, cfg.mean_teacher.ema)
    phases = BCPPhases(cfg.bcp) if cfg.method == "bcp" else None
    drs = (
        DifficultyWeights(n_classes, momentum=cfg.ad.drs_momentum)
        if cfg.method == "ad" and cfg.ad.drs
        else None
    )
    fixmatch = cfg.method in ("fixmatch", "flexmatch")
    policy: ThresholdPolicy | None = None
    layout: VoxelMemoryLayout | None = None
    th = cfg.threshold
    if cfg.pseudo_label_policy == "fixed":
        policy = FixedThreshold(th.tau)
    elif cfg.pseudo_label_policy == "flexmatch":
        layout = VoxelMemoryLayout([v.image.array.shape for v in unlabeled], th.memory_stride)
        policy = FlexMatchThreshold(
            n_classes,
            layout.n_samples,
            tau=th.tau,
            warmup=th.warmup,
            mapping=th.mapping,
            device=dev,
        )
    parts: PatchCLParts | None = None
    if cfg.method == "patchcl":
        pc = cfg.patchcl
        head = ProjectionHead(16 * cfg.model.width, pc.hidden, pc.embedding_dim).to(dev)
        parts = PatchCLParts(
            head,
            copy.deepcopy(head),
            EmbeddingQueues(n_classes, pc.embedding_dim, pc.queue_length, device=dev),
        )
    o = cfg.optim
    optimizer, scheduler = _optimiser(cfg, model, phases, parts.head if parts is not None else None)
    start = 0
    if resume:
        state = resume_from_last(manager, model, optimizer, scheduler)
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        if drs is not None:
            drs.load_state_dict(state["drs"])
        if phases is not None:
            phases.load_state_dict(state["bcp"])
        if policy is not None:
            policy.load_state_dict(state["threshold"])
        if parts is not None:
            parts.head.load_state_dict(state["patchcl"]["head"])
            parts.teacher_head.load_state_dict(state["patchcl"]["teacher_head"])
            parts.queues.load_state_dict(state["patchcl"]["queues"])
        start = int(state["step"])
    elif teacher is not None:
        teacher.load_state_dict(model.state_dict())
    if teacher is not None:
        teacher.train()
        for p in teacher.parameters():
            p.requires_grad_(False)
    model = wrap_ddp(model, env)
    model.train()
    if parts is not None:
        parts.head = wrap_ddp(parts.head, env)
        for p in parts.teacher_head.parameters():
            p.requires_grad_(False)

    svda = SVDA() if d.svda else None
    pad = norm.pad_value
    batch = o.batch_size
    labeled_crops = SegCrops(
        labeled, d.patch, lookup, svda, pad, cfg.seed, 1, foreground=d.foreground_fraction
    )
    labeled_stream = batch_stream(labeled_crops, batch, start, o.steps - start, d.workers, env)
    # Unlabeled crop i·batch.. feeds step i; BCP draws none while it pre-trains.
    unlabeled_start = max(start, phases.pretrain_steps if phases is not None else 0)
    unlabeled_crops = (
        SegCrops(
            unlabeled,
            d.patch,
            lookup,
            svda,
            pad,
            cfg.seed,
            2,
            weak_strong=fixmatch or parts is not None,
            layout=layout,
        )
        if semi
        else None
    )
    unlabeled_stream = (
        batch_stream(unlabeled_crops, batch, unlabeled_start, o.steps - unlabeled_start, d.workers, env)
        if unlabeled_crops is not None
        else None
    )
    params = segmentation_params(cfg, n_classes)
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cfg.amp and dev.type == "cuda"
        else nullcontext()
    )

    def state(step: int, metrics: dict[str, float] | None) -> dict[str, Any]:
        return {
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "config": config_to_dict(cfg),
            "step": step,
            "rng": rng_state(),
            "kind": CHECKPOINT_KIND,
            "classes": {str(k): v for k, v in names.items()},
            "teacher": teacher.state_dict() if teacher is not None else None,
            "drs": drs.state_dict() if drs is not None else None,
            "bcp": phases.state_dict() if phases is not None else None,
            "threshold": policy.state_dict() if policy is not None else None,
            "patchcl": {
                "head": unwrap(parts.head).state_dict(),
                "teacher_head": parts.teacher_head.state_dict(),
                "queues": parts.queues.state_dict(),
            }
            if parts is not None
            else None,
            "provenance": provenance,
            "metrics": dict(metrics or {}),
        }

    with TrainLogger(
        out, o.steps, enabled=env.is_main, resume_step=start if resume else None
    ) as logger:
        for step in range(start, o.steps):
            pretraining = phases is not None and phases.pretraining(step)
            if phases is not None and step == phases.pretrain_steps:
                assert teacher is not None
                phases.start_self_training(unwrap(model), teacher, optimizer)
            generator = torch.Generator().manual_seed(
                int(np.random.default_rng([cfg.seed, 5, step, env.rank]).integers(2**62))
            )
            lab = to_device(next(labeled_stream), dev)
            if ce_weights is not None:
                lab["ce_weights"] = ce_weights.to(dev)
            with amp:
                if cfg.method == "ad":
                    assert unlabeled_stream is not None
                    losses = ad_step(
                        model,
                        unwrap(model),
                        lab,
                        to_device(next(unlabeled_stream), dev),
                        drs,
                        step,
                        cfg,
                        generator,
                    )
                elif cfg.method == "mean-teacher":
                    assert teacher is not None and unlabeled_stream is not None
                    losses = mean_teacher_step(
                        model,
                        teacher,
                        lab,
                        to_device(next(unlabeled_stream), dev),
                        step,
                        cfg,
                        generator,
                        policy,
                    )
                elif parts is not None:
                    assert teacher is not None and unlabeled_stream is not None
                    losses = patchcl_step(
                        model,
                        teacher,
                        parts,
                        lab,
                        to_device(next(unlabeled_stream), dev),
                        step,
                        cfg,
                        policy,
                    )
                elif fixmatch:
                    assert policy is not None and unlabeled_stream is not None
                    losses = fixmatch_step(
                        model, lab, to_device(next(unlabeled_stream), dev), policy, cfg
                    )
                elif pretraining:
                    losses = bcp_pretrain_step(model, lab, cfg, generator)
                elif cfg.method == "bcp":
                    assert teacher is not None and unlabeled_stream is not None
                    losses = bcp_self_train_step(
                        model,
                        teacher,
                        lab,
                        to_device(next(unlabeled_stream), dev),
                        cfg,
                        generator,
                        policy,
                    )
                else:
                    losses = supervised_seg_step(model, lab)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"loss became {loss.item()} at step {step}; stopping. The last good checkpoint "
                    f"({manager.latest() or 'none yet'}) is kept; lower optim.lr or check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if teacher is not None and not pretraining:
                ema_update(teacher, unwrap(model), ema)
            if parts is not None:
                ema_update(parts.teacher_head, unwrap(parts.head), ema)
            scalars = {k: float(v.detach()) for k, v in losses.items()}
            logger.log(step + 1, lr=scheduler.get_last_lr()[0], **scalars)
            logger.advance(step + 1, loss=scalars["loss"])
            last_pretraining = phases is not None and step + 1 == phases.pretrain_steps
            if (step + 1) % cfg.eval.every == 0 or step + 1 == o.steps or last_pretraining:
                metrics = None
                if env.is_main and validation:
                    metrics = validate_segmenter(
                        unwrap(model), validation, lookup, params, dev, cfg.amp
                    )
                    if pretraining:
                        metrics = {f"pretrain_{k}": v for k, v in metrics.items()}
                    logger.log(step + 1, **{f"val/{k}": v for k, v in metrics.items()})
                if phases is not None and pretraining:
                    phases.observe_pretrained(
                        step + 1, unwrap(model), metrics["pretrain_dice"] if metrics else None
                    )
                if env.is_main:
                    manager.save(state(step + 1, metrics), step + 1, metrics)
    if not env.is_main:
        return SegmentationRun(out, manager.latest() or out, None)
    best = manager.best() or manager.latest()
    assert best is not None
    net = inference_net(manager.load(best)).to(dev)
    report = (
        test_segmenter(net, split.test, lookup, params, names, dev, cfg.amp, out / "test")
        if split.test
        else None
    )
    return SegmentationRun(out, best, report)
