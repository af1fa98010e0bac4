"""The detector trainer behind ``medssl-train focalmix`` and ``medssl-train supervised-det``.

Before every validation and checkpoint the BatchNorm running statistics are re-estimated on
``eval.bn_windows`` sliding windows of the labeled training scans (:mod:`medssl.training.batchnorm`),
so validation, the checkpoints (and so the test and the export) use the statistics of the
windows inference runs on.

A run folder holds ``config.yaml``, ``split.json``, ``checkpoints/`` (periodic, ``last.pt``,
``best.pt`` by validation CPM), ``tensorboard/``, ``log.jsonl`` and, at the end,
``test/submission.csv`` (LUNA16 format), ``test/cpm.json`` and ``test/froc.png``
computed with the best checkpoint on the held-out test subsets.

With ``focalmix.object_policy: flexmatch`` the CPL memory of the object choice
(:class:`~medssl.training.detection.focalmix.CPLObjectSelection`, keyed by cells of the unlabeled scans'
cached volumes) is saved in the checkpoints (``threshold``), so a resumed run continues with the
same memory and thresholds.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.config import config_to_dict, dump_config
from medssl.datasets.luna16 import Finding, read_findings
from medssl.datasets.splits import write_split
from medssl.detection import AnchorGrid
from medssl.errors import MedsslError, VolumeReadError
from medssl.metrics import plot_froc, write_predictions
from medssl.pipeline import Intensity
from medssl.pipeline.detect import prepared_lung_mask, window_touches
from medssl.training.batchnorm import inference_windows, reestimate_batchnorm
from medssl.training.cache import CachedVolume, VolumeCache, default_cache_dir
from medssl.training.checkpoint import CheckpointManager, resume_from_last, rng_state
from medssl.training.detection.augment import ScannerAugment
from medssl.training.detection.config import DetectionExperiment
from medssl.training.detection.data import LabeledPatches, ScanBoxes, UnlabeledPatches
from medssl.training.detection.eval import TorchDetectionRunner, detection_params, evaluate, predict
from medssl.training.detection.focalmix import CPLObjectSelection
from medssl.training.detection.mining import (
    CandidateLists,
    NoduleTruth,
    hard_negatives,
    refresh_scans,
    scan_candidates,
)
from medssl.training.detection.operating import write_operating_point
from medssl.training.detection.scans import (
    DetectionSplit,
    ScanSource,
    _folder_sources,
    split_luna16,
)
from medssl.training.detection.steps import focalmix_step, supervised_step
from medssl.training.distributed import DistEnv, cleanup, init_distributed, unwrap, wrap_ddp
from medssl.training.logger import TrainLogger
from medssl.training.loop import TrainingDivergedError
from medssl.training.networks.detector import FPNDetector
from medssl.training.seed import seed_everything
from medssl.training.streams import batch_stream, to_device

__all__ = ["DetectionRun", "train_detector"]

#: Validation CPM is computed without a bootstrap (only the point value selects checkpoints).
VALIDATION_BOOTSTRAP = 0


@dataclass(frozen=True)
class DetectionRun:
    """What a finished run produced."""

    out: Path
    best_checkpoint: Path
    test_cpm: float | None
    test_report: dict[str, Any] | None


def _cache(cfg: DetectionExperiment) -> VolumeCache:
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    return VolumeCache(root, cfg.data.spacing_mm, Intensity(cfg.data.hu_min, cfg.data.hu_max))


def _scan_boxes(cached: CachedVolume, nodules: list[Finding], spacing_mm: float) -> ScanBoxes:
    """Nodules (LPS mm) as cubes ``(z, y, x, d)`` on the cached grid."""
    if not nodules:
        return ScanBoxes(cached, np.zeros((0, 4), dtype=np.float32))
    centres = cached.world_to_index(np.array([n.centre_lps for n in nodules]))
    diameters = np.array([[max(n.diameter_mm, 1.0) / spacing_mm] for n in nodules])
    return ScanBoxes(cached, np.concatenate([centres, diameters], axis=1).astype(np.float32))


def _readable(cache: VolumeCache, sources: list[ScanSource]) -> list[CachedVolume]:
    """Cache the unlabeled scans, skipping (with a warning naming each) those that cannot be
    read: one corrupt series in a 3000-scan archive must not stop a run."""
    volumes = []
    for source in sources:
        try:
            volumes.append(cache.get(source.key, source.load))
        except VolumeReadError as exc:
            warnings.warn(f"skipping unlabeled scan {source.key}: {exc}", stacklevel=2)
    return volumes


def _state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: DetectionExperiment,
    step: int,
    provenance: dict[str, Any],
    metrics: dict[str, float] | None,
    objects: CPLObjectSelection | None,
    mined: dict[str, CandidateLists],
) -> dict[str, Any]:
    """A checkpoint; ``provenance`` and ``metrics`` (validation at this step) go to model cards;
    ``threshold``: the CPL object selection's memory (None without CPL); ``mined``: the hard
    negatives and unlabeled crop centres the following steps sample from."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": config_to_dict(cfg),
        "step": step,
        "rng": rng_state(),
        "kind": "medssl.detector",
        "provenance": provenance,
        "metrics": dict(metrics or {}),
        "threshold": objects.state_dict() if objects is not None else None,
        "mined": {name: lists.state_dict() for name, lists in mined.items()},
    }


def _unlabeled_truth(
    data: Path, split: DetectionSplit, unlabeled: list[CachedVolume], spacing_mm: float
) -> NoduleTruth | None:
    """The hidden nodules of the unlabeled scans, for diagnostics only: ``<data>/unlabeled/
    truth_annotations.csv`` (``medssl synth chest`` writes it) for the scans of that folder, the
    annotations of the leftover LUNA16 pool for those. None when no scan's truth is known."""
    folder = data / "unlabeled"
    truth_file = folder / "truth_annotations.csv"
    known: dict[str, list[Finding]] = {}
    if truth_file.is_file():
        known = {source.key: [] for source in _folder_sources(folder)}
        for finding in read_findings(truth_file):
            known.setdefault(finding.seriesuid, []).append(finding)
    for uid in split.split.unlabeled:
        known[uid] = split.nodules(uid)
    nodules = [
        _scan_boxes(v, known[v.key], spacing_mm).boxes if v.key in known else None
        for v in unlabeled
    ]
    return NoduleTruth(nodules) if any(n is not None for n in nodules) else None


def _mine(
    model: torch.nn.Module,
    volumes: list[CachedVolume],
    scans: list[int],
    cfg: DetectionExperiment,
    device: torch.device,
    top_k: int,
) -> dict[int, np.ndarray]:
    """The current weights' best ``top_k`` candidates ``(M, 4)`` (z, y, x voxels, probability) on
    the scans ``scans`` of ``volumes``, through the shared pipeline (validation's parameters)."""
    runner = TorchDetectionRunner(unwrap(model), cfg.window, device, cfg.amp)
    params = detection_params(cfg)
    found = {i: scan_candidates(runner, volumes[i], params, top_k=top_k) for i in scans}
    unwrap(model).train()
    return found


def _statistics_windows(
    labeled: list[ScanBoxes], cfg: DetectionExperiment
) -> list[tuple[int, tuple[int, int, int]]]:
    """The windows BatchNorm statistics are re-estimated on (``eval.bn_windows``): sliding windows
    of the labeled scans, those touching the lung mask when inference uses it."""
    if not cfg.eval.bn_windows:
        return []
    keep = None
    if cfg.eval.lung_mask:
        params = detection_params(cfg)
        masks = [prepared_lung_mask(s.volume.to_volume(), params) for s in labeled]
        # a scan where no lung is found is run whole by inference (detect_preprocessed)
        keep = lambda i, start: (
            not masks[i].any() or window_touches(masks[i], start, params.window_shape)
        )
    return inference_windows(
        [s.volume.array.shape for s in labeled],
        window=cfg.window,
        overlap=cfg.eval.overlap,
        count=cfg.eval.bn_windows,
        seed=cfg.seed,
        keep=keep,
    )


def _validate(
    model: torch.nn.Module,
    split: DetectionSplit,
    volumes: dict[str, CachedVolume],
    cfg: DetectionExperiment,
    device: torch.device,
) -> dict[str, float]:
    """Validation CPM of the current weights (LUNA16 FROC, no bootstrap)."""
    runner = TorchDetectionRunner(unwrap(model), cfg.window, device, cfg.amp)
    predictions = predict(runner, volumes, detection_params(cfg))
    uids = list(volumes)
    nodules = [f for u in uids for f in split.nodules(u)]
    excluded = [f for u in uids for f in split.luna.excluded(u)]
    result = evaluate(predictions, nodules, excluded, uids, VALIDATION_BOOTSTRAP)
    unwrap(model).train()
    return {
        "cpm": result.cpm,
        **{f"sens@{r:g}": s for r, s in zip(result.fp_rates, result.sensitivities)},
    }


def _test(
    model: torch.nn.Module,
    split: DetectionSplit,
    cache: VolumeCache,
    cfg: DetectionExperiment,
    device: torch.device,
    out: Path,
) -> dict[str, Any]:
    """Submission CSV, CPM report and FROC plot on the test subsets."""
    out.mkdir(parents=True, exist_ok=True)
    volumes = {u: cache.get(u, split.source(u).load) for u in split.test}
    runner = TorchDetectionRunner(model, cfg.window, device, cfg.amp)
    predictions = predict(runner, volumes, detection_params(cfg))
    write_predictions(out / "submission.csv", predictions)
    (out / "seriesuids.csv").write_text("".join(f"{u}\n" for u in split.test))
    nodules = [f for u in split.test for f in split.nodules(u)]
    excluded = [f for u in split.test for f in split.luna.excluded(u)]
    result = evaluate(predictions, nodules, excluded, split.test, cfg.eval.bootstrap, cfg.seed)
    report = result.to_json()
    (out / "cpm.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_froc(result, out / "froc.png")
    return report


def train_detector(
    cfg: DetectionExperiment,
    data: str | Path,
    out: str | Path,
    n_labeled: int,
    n_unlabeled: int = 0,
    resume: bool = False,
    device: str | None = None,
) -> DetectionRun:
    """Train (or resume) a detector run and evaluate it on the LUNA16 test subsets.

    Args:
        cfg: the validated experiment; ``cfg.method`` picks supervised or FocalMix.
        data: a LUNA16 folder (optionally with ``unlabeled/``).
        out: the run folder.
        n_labeled, n_unlabeled: scans used with and without their annotations.
        resume: continue from ``out/checkpoints/last.pt``.
        device: ``"cpu"``, ``"cuda"``...; default: the DDP rank's GPU, else CPU.

    Raises:
        TrainingDivergedError: the loss became NaN/inf (the last good checkpoint stays).
        MedsslError: bad data layout, or ``resume`` without a checkpoint.
    """
    env = init_distributed(prefer_cuda=device != "cpu")
    dev = torch.device(device) if device else env.device
    out = Path(out)
    try:
        return _train(cfg, Path(data), out, n_labeled, n_unlabeled, resume, env, dev)
    finally:
        cleanup()


def _train(
    cfg: DetectionExperiment,
    data: Path,
    out: Path,
    n_labeled: int,
    n_unlabeled: int,
    resume: bool,
    env: DistEnv,
    dev: torch.device,
) -> DetectionRun:
    semi = cfg.method == "focalmix"
    if semi and n_unlabeled < 1:
        raise MedsslError("focalmix needs unlabeled scans: pass --unlabeled M with M >= 1")
    seed_everything(cfg.seed + env.rank)
    d = cfg.data
    split = split_luna16(
        data,
        n_labeled,
        n_unlabeled if semi else 0,
        d.test_subsets,
        d.n_validation,
        d.split_seed,
        d.unlabeled_dirs,
    )
    if semi and not split.unlabeled:
        raise MedsslError(
            f"{data}: no unlabeled scans found (unlabeled/ folder or leftover training pool)"
        )
    manager = CheckpointManager(out, metric="cpm")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
        write_split(split.split, out / "split.json")
    cache = _cache(cfg)
    labeled = [
        _scan_boxes(cache.get(u, split.source(u).load), split.nodules(u), d.spacing_mm)
        for u in split.labeled
    ]
    validation = {u: cache.get(u, split.source(u).load) for u in split.validation}
    unlabeled = _readable(cache, split.unlabeled)
    mine_negatives = d.hard_negative_fraction > 0
    mine_unlabeled = semi and cfg.focalmix.candidate_fraction > 0
    excluded = (
        [
            _scan_boxes(s.volume, split.luna.excluded(u), d.spacing_mm).boxes
            for s, u in zip(labeled, split.labeled)
        ]
        if mine_negatives
        else []
    )
    truth = _unlabeled_truth(data, split, unlabeled, d.spacing_mm) if semi else None
    mined = {
        "hard_negatives": CandidateLists.empty(len(labeled)),
        "unlabeled_candidates": CandidateLists.empty(len(unlabeled)),
    }
    provenance = {
        "method": cfg.method,
        "data": str(data.resolve()),
        "n_labeled": len(split.labeled),
        "n_unlabeled": len(unlabeled),
        "n_validation": len(split.validation),
    }

    grid = AnchorGrid.build(cfg.anchors, (d.patch,) * 3)
    pad = Intensity(d.hu_min, d.hu_max).pad_value
    model = FPNDetector(cfg.model, cfg.anchors).to(dev)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.optim.steps)
    fm = cfg.focalmix
    objects = (
        CPLObjectSelection(
            [v.array.shape for v in unlabeled],
            tau=fm.object_threshold,
            memory_stride=fm.object_memory_stride,
        )
        if semi and fm.object_policy == "flexmatch"
        else None
    )
    start = 0
    if resume:
        state = resume_from_last(manager, model, optimizer, scheduler)
        if objects is not None:
            if state.get("threshold") is None:
                raise MedsslError(
                    f"{out}: the last checkpoint has no CPL memory (written with "
                    "focalmix.object_policy fixed?); resume with the run's own config"
                )
            objects.load_state_dict(state["threshold"])
        start = int(state["step"])
        saved = state.get("mined") or {}
        sizes = {"hard_negatives": len(labeled), "unlabeled_candidates": len(unlabeled)}
        mined.update(
            {
                name: CandidateLists.from_state(saved[name], sizes[name])
                for name in mined
                if name in saved
            }
        )
    model = wrap_ddp(model, env)
    model.train()

    steps = cfg.optim.steps
    batch = cfg.optim.batch_size

    def labeled_loader(first: int) -> Iterator[dict[str, torch.Tensor]]:
        # samples are a pure function of (seed, index, mined list): rebuilt when the list changes
        patches = LabeledPatches(
            labeled,
            grid,
            d.positive_fraction,
            True,
            pad,
            cfg.seed,
            hard_negatives=mined["hard_negatives"].centres,
            hard_negative_fraction=d.hard_negative_fraction,
            scanner=ScannerAugment(d.scanner_augment, d.hu_max - d.hu_min)
            if d.scanner_augment > 0
            else None,
        )
        return batch_stream(patches, batch, first, steps - first, d.workers, env)

    def unlabeled_loader(first: int) -> Iterator[dict[str, torch.Tensor]]:
        patches = UnlabeledPatches(
            unlabeled,
            d.patch,
            pad,
            cfg.seed,
            candidates=mined["unlabeled_candidates"].centres,
            candidate_fraction=cfg.focalmix.candidate_fraction,
        )
        return batch_stream(patches, batch, first, steps - first, d.workers, env)

    labeled_stream = labeled_loader(start)
    unlabeled_stream = unlabeled_loader(start) if semi else None
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cfg.amp and dev.type == "cuda"
        else nullcontext()
    )
    statistics_windows = _statistics_windows(labeled, cfg)
    with TrainLogger(
        out, steps, enabled=env.is_main, resume_step=start if resume else None
    ) as logger:
        for step in range(start, steps):
            rng = np.random.default_rng([cfg.seed, 3, step, env.rank])
            labeled_batch = to_device(next(labeled_stream), dev)
            with amp:
                if unlabeled_stream is not None:
                    losses = focalmix_step(
                        model,
                        unwrap(model),
                        labeled_batch,
                        to_device(next(unlabeled_stream), dev),
                        grid,
                        step,
                        cfg,
                        rng,
                        objects,
                        truth,
                    )
                else:
                    losses = supervised_step(model, labeled_batch, cfg)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"loss became {loss.item()} at step {step}; stopping. The last good checkpoint "
                    f"({manager.latest() or 'none yet'}) is kept; lower optim.lr or check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            scalars = {k: float(v.detach()) for k, v in losses.items()}
            logger.log(step + 1, lr=scheduler.get_last_lr()[0], **scalars)
            logger.advance(step + 1, loss=scalars["loss"])
            if (step + 1) % cfg.eval.every == 0 or step + 1 == steps:
                if statistics_windows:
                    # the statistics validation, mining, the checkpoint and the export use; every
                    # rank computes the same (same weights, same windows), so mining agrees
                    with amp:
                        reestimate_batchnorm(
                            unwrap(model),
                            [s.volume.array for s in labeled],
                            statistics_windows,
                            window=cfg.window,
                            pad_value=pad,
                            batch_size=batch,
                            device=dev,
                        )
                metrics = (
                    _validate(model, split, validation, cfg, dev)
                    if (validation and env.is_main)
                    else None
                )
                round_index, more = (step + 1) // cfg.eval.every, step + 1 < steps
                mining: dict[str, float] = {}
                if mine_negatives and more:
                    scans = refresh_scans(len(labeled), d.hard_negative_scans, round_index)
                    found = _mine(
                        model,
                        [s.volume for s in labeled],
                        scans,
                        cfg,
                        dev,
                        d.hard_negatives_per_scan,
                    )
                    mined["hard_negatives"] = mined["hard_negatives"].replace(
                        {
                            i: hard_negatives(
                                c, labeled[i].boxes, excluded[i], spacing_mm=d.spacing_mm
                            )
                            for i, c in found.items()
                        }
                    )
                    mining["hard_negatives"] = float(
                        sum(len(c) for c in mined["hard_negatives"].centres)
                    )
                    labeled_stream = labeled_loader(step + 1)
                if mine_unlabeled and more:
                    scans = refresh_scans(len(unlabeled), cfg.focalmix.candidate_scans, round_index)
                    found = _mine(
                        model, unlabeled, scans, cfg, dev, cfg.focalmix.candidates_per_scan
                    )
                    mined["unlabeled_candidates"] = mined["unlabeled_candidates"].replace(
                        {i: c[:, :3] for i, c in found.items()}
                    )
                    mining["unlabeled_candidates"] = float(sum(len(c) for c in found.values()))
                    if truth is not None:  # diagnostics only
                        hits, total = truth.precision({i: c[:, :3] for i, c in found.items()})
                        if total:
                            mining["candidate_precision"] = hits / total
                    unlabeled_stream = unlabeled_loader(step + 1)
                if env.is_main:
                    if metrics:
                        logger.log(step + 1, **{f"val/{k}": v for k, v in metrics.items()})
                    if mining:
                        logger.log(step + 1, **{f"mining/{k}": v for k, v in mining.items()})
                    manager.save(
                        _state(
                            model,
                            optimizer,
                            scheduler,
                            cfg,
                            step + 1,
                            provenance,
                            metrics,
                            objects,
                            mined,
                        ),
                        step + 1,
                        metrics,
                    )
    if not env.is_main:
        return DetectionRun(out, manager.latest() or out, None, None)
    best = manager.best() or manager.latest()
    assert best is not None
    net = FPNDetector(cfg.model, cfg.anchors)
    net.load_state_dict(manager.load(best)["model"])
    report = _test(net.to(dev), split, cache, cfg, dev, out / "test") if split.test else None
    write_operating_point(
        net, split, cache, cfg, dev, out, report
    )  # validation/, and the test report at it
    cpm = report["cpm"] if report else None
    return DetectionRun(out, best, None if cpm is None or math.isnan(cpm) else cpm, report)
