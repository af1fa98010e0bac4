"""The detector trainer behind ``medssl-train focalmix`` and ``medssl-train supervised-det``.

Before every validation and checkpoint the BatchNorm running statistics are re-estimated on
``eval.bn_windows`` sliding windows of the labeled training scans
(:mod:`medssl.training.batchnorm`),
so validation, the checkpoints (and so the test and the export) use the statistics of the
windows inference runs on.

The loop (:func:`medssl.training.loop.fit`) runs the method (:mod:`medssl.training.methods`,
``cfg.method``); this module is the detection :class:`~medssl.training.loop.Task`.

A run folder holds ``config.yaml``, ``split.json``, ``checkpoints/`` (periodic, ``last.pt``,
``best.pt`` by validation CPM), ``tensorboard/``, ``log.jsonl`` and, at the end,
``test/submission.csv`` (LUNA16 format), ``test/cpm.json`` and ``test/froc.png``
computed with the best checkpoint on the held-out test subsets.

With ``focalmix.object_policy: flexmatch`` the CPL memory of the object choice
(:class:`~medssl.training.detection.focalmix.CPLObjectSelection`, keyed by cells of the unlabeled
scans'
cached volumes) is saved in the checkpoints (``method.threshold``), so a resumed run continues with
the
same memory and thresholds.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.config import dump_config
from medssl.datasets.luna16 import Finding, read_findings
from medssl.datasets.splits import write_split
from medssl.detection import AnchorGrid
from medssl.errors import MedsslError, VolumeReadError
from medssl.metrics import plot_froc, write_predictions
from medssl.pipeline import Intensity
from medssl.pipeline.detect import prepared_lung_mask, window_touches
from medssl.training.batchnorm import inference_windows, reestimate_batchnorm
from medssl.training.cache import CachedVolume, VolumeCache, default_cache_dir
from medssl.training.checkpoint import CheckpointKind, CheckpointManager
from medssl.training.detection.augment import ScannerAugment
from medssl.training.detection.config import DetectionExperiment
from medssl.training.detection.data import LabeledPatches, ScanBoxes, UnlabeledPatches
from medssl.training.detection.eval import TorchDetectionRunner, detection_params, evaluate, predict
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
from medssl.training.distributed import DistEnv, cleanup, init_distributed, unwrap
from medssl.training.loop import Task, fit
from medssl.training.methods.base import Batch, Method, load_method
from medssl.training.networks.detector import FPNDetector
from medssl.training.streams import batch_stream, to_device

__all__ = ["DetectionRun", "DetectionTask", "train_detector"]

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
            known.setdefault(finding.series_uid, []).append(finding)
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

        def keep(i: int, start: Sequence[int]) -> bool:
            return not masks[i].any() or window_touches(masks[i], start, params.window)

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


class DetectionTask(Task):
    """LUNA16 scans: split, cached scans, labeled and unlabeled patch streams (rebuilt when
    mining refreshes their crop centres), BatchNorm re-estimation before validation, validation
    CPM, hard-negative and candidate mining, the test and the operating point at the end."""

    kind = CheckpointKind.DETECTOR
    metric = "cpm"
    cfg: DetectionExperiment

    def __init__(
        self,
        cfg: DetectionExperiment,
        data: Path,
        out: Path,
        n_labeled: int,
        n_unlabeled: int,
        env: DistEnv,
        device: torch.device,
    ) -> None:
        super().__init__(cfg, out, env, device)
        self.root, self.n_labeled, self.n_unlabeled = data, n_labeled, n_unlabeled
        self.grad_clip = cfg.optim.grad_clip

    def prepare(self, method: Method) -> None:
        cfg, d, data = self.cfg, self.cfg.data, self.root
        semi = self.semi = method.uses_unlabeled
        if semi and self.n_unlabeled < 1:
            raise MedsslError(f"{cfg.method} needs unlabeled scans: pass --unlabeled M with M >= 1")
        split = self.split = split_luna16(
            data,
            self.n_labeled,
            self.n_unlabeled if semi else 0,
            d.test_subsets,
            d.n_validation,
            d.split_seed,
            d.unlabeled_dirs,
        )
        if semi and not split.unlabeled:
            raise MedsslError(
                f"{data}: no unlabeled scans found (unlabeled/ folder or leftover training pool)"
            )
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
            write_split(split.split, self.out / "split.json")
        cache = self.cache = _cache(cfg)
        self.labeled = [
            _scan_boxes(cache.get(u, split.source(u).load), split.nodules(u), d.spacing_mm)
            for u in split.labeled
        ]
        self.validation = {u: cache.get(u, split.source(u).load) for u in split.validation}
        self.unlabeled = _readable(cache, split.unlabeled)
        self.mine_negatives = d.hard_negative_fraction > 0
        self.mine_unlabeled = semi and cfg.focalmix.candidate_fraction > 0
        self.excluded = (
            [
                _scan_boxes(s.volume, split.luna.excluded(u), d.spacing_mm).boxes
                for s, u in zip(self.labeled, split.labeled)
            ]
            if self.mine_negatives
            else []
        )
        self.truth: NoduleTruth | None = (
            _unlabeled_truth(data, split, self.unlabeled, d.spacing_mm) if semi else None
        )
        self.mined = {
            "hard_negatives": CandidateLists.empty(len(self.labeled)),
            "unlabeled_candidates": CandidateLists.empty(len(self.unlabeled)),
        }
        self._provenance = {
            "method": cfg.method,
            "data": str(data.resolve()),
            "n_labeled": len(split.labeled),
            "n_unlabeled": len(self.unlabeled),
            "n_validation": len(split.validation),
        }
        self.grid = AnchorGrid.build(cfg.anchors, (d.patch,) * 3)
        self.pad = Intensity(d.hu_min, d.hu_max).pad_value

    def state_dict(self) -> dict[str, Any]:
        """The hard negatives and unlabeled crop centres the following steps sample from."""
        return {name: lists.state_dict() for name, lists in self.mined.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sizes = {"hard_negatives": len(self.labeled), "unlabeled_candidates": len(self.unlabeled)}
        self.mined.update(
            {
                name: CandidateLists.from_state(state[name], sizes[name])
                for name in self.mined
                if name in state
            }
        )

    def _labeled_loader(self, first: int) -> Iterator[dict[str, torch.Tensor]]:
        # samples are a pure function of (seed, index, mined list): rebuilt when the list changes
        cfg, d = self.cfg, self.cfg.data
        patches = LabeledPatches(
            self.labeled,
            self.grid,
            d.positive_fraction,
            True,
            self.pad,
            cfg.seed,
            hard_negatives=self.mined["hard_negatives"].centres,
            hard_negative_fraction=d.hard_negative_fraction,
            scanner=ScannerAugment(d.scanner_augment, d.hu_max - d.hu_min)
            if d.scanner_augment > 0
            else None,
        )
        steps, batch = cfg.optim.steps, cfg.optim.batch_size
        return batch_stream(patches, batch, first, steps - first, d.workers, self.env)

    def _unlabeled_loader(self, first: int) -> Iterator[dict[str, torch.Tensor]]:
        cfg, d = self.cfg, self.cfg.data
        patches = UnlabeledPatches(
            self.unlabeled,
            d.patch,
            self.pad,
            cfg.seed,
            candidates=self.mined["unlabeled_candidates"].centres,
            candidate_fraction=cfg.focalmix.candidate_fraction,
        )
        steps, batch = cfg.optim.steps, cfg.optim.batch_size
        return batch_stream(patches, batch, first, steps - first, d.workers, self.env)

    def open_streams(self, start: int, method: Method) -> None:
        self._labeled = self._labeled_loader(start)
        self._unlabeled = self._unlabeled_loader(start) if self.semi else None
        self.statistics_windows = _statistics_windows(self.labeled, self.cfg)

    def _next_unlabeled(self) -> dict[str, torch.Tensor]:
        if self._unlabeled is None:
            raise MedsslError(f"{self.cfg.method} drew an unlabeled batch it did not declare")
        return to_device(next(self._unlabeled), self.device)

    def batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.cfg.seed, 3, step, self.env.rank])
        labeled = to_device(next(self._labeled), self.device)
        return Batch(labeled, self._next_unlabeled, rng=rng)

    def provenance(self) -> dict[str, Any]:
        return self._provenance

    def before_validation(self, network: torch.nn.Module) -> None:
        if not self.statistics_windows:
            return
        # the statistics validation, mining, the checkpoint and the export use; every rank
        # computes the same (same weights, same windows), so mining agrees
        with self.amp:
            reestimate_batchnorm(
                network,
                [s.volume.array for s in self.labeled],
                self.statistics_windows,
                window=self.cfg.window,
                pad_value=self.pad,
                batch_size=self.cfg.optim.batch_size,
                device=self.device,
            )

    def validate(self, network: torch.nn.Module) -> dict[str, float] | None:
        if not self.validation:
            return None
        return _validate(network, self.split, self.validation, self.cfg, self.device)

    def after_validation(self, step: int, method: Method) -> dict[str, float]:
        """Mine hard negatives and unlabeled candidates with the current weights (not after the
        last step) and restart the streams that sample from them; the counts are logged."""
        cfg, d, model = self.cfg, self.cfg.data, method.network
        round_index, more = step // cfg.eval.every, step < cfg.optim.steps
        mining: dict[str, float] = {}
        if self.mine_negatives and more:
            scans = refresh_scans(len(self.labeled), d.hard_negative_scans, round_index)
            volumes = [s.volume for s in self.labeled]
            found = _mine(model, volumes, scans, cfg, self.device, d.hard_negatives_per_scan)
            self.mined["hard_negatives"] = self.mined["hard_negatives"].replace(
                {
                    i: hard_negatives(
                        c, self.labeled[i].boxes, self.excluded[i], spacing_mm=d.spacing_mm
                    )
                    for i, c in found.items()
                }
            )
            mining["hard_negatives"] = float(
                sum(len(c) for c in self.mined["hard_negatives"].centres)
            )
            self._labeled = self._labeled_loader(step)
        if self.mine_unlabeled and more:
            fm = cfg.focalmix
            scans = refresh_scans(len(self.unlabeled), fm.candidate_scans, round_index)
            found = _mine(model, self.unlabeled, scans, cfg, self.device, fm.candidates_per_scan)
            self.mined["unlabeled_candidates"] = self.mined["unlabeled_candidates"].replace(
                {i: c[:, :3] for i, c in found.items()}
            )
            mining["unlabeled_candidates"] = float(sum(len(c) for c in found.values()))
            if self.truth is not None:  # diagnostics only
                hits, total = self.truth.precision({i: c[:, :3] for i, c in found.items()})
                if total:
                    mining["candidate_precision"] = hits / total
            self._unlabeled = self._unlabeled_loader(step)
        return {f"mining/{k}": v for k, v in mining.items()}

    def finish(self, manager: CheckpointManager) -> DetectionRun:
        out, cfg, dev = self.out, self.cfg, self.device
        if not self.env.is_main:
            return DetectionRun(out, manager.latest() or out, None, None)
        best = manager.best() or manager.latest()
        assert best is not None
        net = FPNDetector(cfg.model, cfg.anchors)
        net.load_state_dict(manager.load(best)["model"])
        split = self.split
        report = (
            _test(net.to(dev), split, self.cache, cfg, dev, out / "test") if split.test else None
        )
        # validation/, and the test report at it
        write_operating_point(net, split, self.cache, cfg, dev, out, report)
        cpm = report["cpm"] if report else None
        return DetectionRun(out, best, None if cpm is None or math.isnan(cpm) else cpm, report)


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
    try:
        task = DetectionTask(cfg, Path(data), Path(out), n_labeled, n_unlabeled, env, dev)
        return fit(task, load_method(cfg.method)(cfg, task), resume)
    finally:
        cleanup()
