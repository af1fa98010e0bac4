"""The segmentation trainer behind ``medssl-train ad``, ``supervised-seg``, ``mean-teacher``,
``bcp``, ``fixmatch``, ``flexmatch`` and ``patchcl``.

A run folder holds ``config.yaml``, ``split.json``, ``checkpoints/`` (periodic, ``last.pt``,
``best.pt`` by validation Dice), ``tensorboard/``, ``log.jsonl`` and, at the end, ``test/``
(``metrics.json``, ``cases.json``, ``predictions/*.nii.gz``) from the best checkpoint on the
test domains. The loop (:func:`medssl.training.loop.fit`) runs the method
(:mod:`medssl.training.methods`, ``cfg.method``); this module is the segmentation
:class:`~medssl.training.loop.Task`: split, cached volumes, crop streams, validation and test.

Validation (checkpoint choice) uses only the held-out labeled-pool cases (``data.n_validation``),
never the test set. BCP runs in two phases (:class:`~medssl.training.segmentation.bcp.BCPPhases`):
pre-training checkpoints record ``pretrain_dice`` (so ``best.pt`` is always a self-trained
student) and carry the best pre-trained weights, from which self-training starts.
FixMatch/FlexMatch and PatchCL draw weak + strong views of the unlabeled crops. The pseudo-label
policy (``threshold:``; fixed or CPL, also as a filter in
mean teacher and BCP) is the methods'; CPL's memory is keyed by a voxel grid over the unlabeled
cases' cached volumes (:class:`~medssl.training.threshold.VoxelMemoryLayout`,
``threshold.memory_stride``; the crops carry their voxels' ids) and saved in the checkpoints
(``method.threshold``), so a resumed run continues with the same thresholds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.config import dump_config
from medssl.errors import MedsslError
from medssl.training.cache import VolumeCache, default_cache_dir
from medssl.training.checkpoint import CheckpointKind, CheckpointManager
from medssl.training.distributed import cleanup, init_distributed
from medssl.training.loop import Task, fit
from medssl.training.methods.base import Batch, Method, SegmentationMethod, load_method
from medssl.training.networks.segmenter import inference_net, place
from medssl.training.segmentation.config import SegmentationExperiment
from medssl.training.segmentation.data import (
    LabeledVolume,
    SegCrops,
    cache_case,
    class_names,
    label_lookup,
    split_domains,
)
from medssl.training.segmentation.eval import (
    normalisation,
    segmentation_params,
    test_segmenter,
    validate_segmenter,
)
from medssl.training.segmentation.losses import frequency_weights
from medssl.training.segmentation.svda import SVDA
from medssl.training.streams import batch_stream, to_device
from medssl.training.threshold import VoxelMemoryLayout

__all__ = ["SegmentationRun", "SegmentationTask", "class_weights", "train_segmenter"]


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


class SegmentationTask(Task):
    """Decathlon-style domains: split, cached volumes on the model grid, crop streams (labeled
    crop ``i`` feeds step ``i // batch``), validation Dice and the test at the end."""

    kind = CheckpointKind.SEGMENTER
    metric = "dice"
    cfg: SegmentationExperiment

    def __init__(
        self,
        cfg: SegmentationExperiment,
        data: Path,
        out: Path,
        env: Any,
        device: torch.device,
    ) -> None:
        super().__init__(cfg, out, env, device)
        self.root = data
        self.layout: VoxelMemoryLayout | None = None

    def prepare(self, method: Method) -> None:
        cfg, d, env = self.cfg, self.cfg.data, self.env
        split = split_domains(self.root, d)
        if method.uses_unlabeled and not split.unlabeled:
            raise MedsslError(
                f"{cfg.method} needs unlabeled cases: lower data.labeled_fraction or add "
                "data.unlabeled_domains"
            )
        self.split = split
        self.names = class_names(split, d)
        self.n_classes = len(self.names)
        self.lookup = label_lookup(split, d)
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
            (self.out / "split.json").write_text(json.dumps(split.to_json(), indent=2) + "\n")
        self.norm = normalisation(d)
        root = Path(d.cache_dir) if d.cache_dir else default_cache_dir()
        cache = VolumeCache(root, d.spacing_mm, self.norm)
        self.labeled = [cache_case(cache, c, True) for c in split.labeled]
        self.unlabeled = (
            [cache_case(cache, c, False) for c in split.unlabeled] if method.uses_unlabeled else []
        )
        self.validation = [cache_case(cache, c, True) for c in split.validation]
        self._provenance: dict[str, Any] = {
            "method": cfg.method,
            "setting": cfg.setting,
            "data": str(self.root.resolve()),
            "domains": list(d.domains),
            "unlabeled_domains": list(d.unlabeled_domains),
            "test_domains": list(d.tested_on),
            "n_labeled": len(self.labeled),
            "n_unlabeled": len(self.unlabeled),
            "n_validation": len(self.validation),
            "n_test": len(split.test),
        }
        self.ce_weights = class_weights(cfg, self.labeled, self.lookup, self.n_classes)
        if self.ce_weights is not None:
            self._provenance["ce_weights"] = [round(float(w), 4) for w in self.ce_weights]
        if cfg.pseudo_label_policy == "flexmatch":
            shapes = [v.image.array.shape for v in self.unlabeled]
            self.layout = VoxelMemoryLayout(shapes, cfg.threshold.memory_stride)
        self.params = segmentation_params(cfg, self.n_classes)

    def open_streams(self, start: int, method: Method) -> None:
        cfg, d, env = self.cfg, self.cfg.data, self.env
        steps, batch = cfg.optim.steps, cfg.optim.batch_size
        svda = SVDA() if d.svda else None
        pad = self.norm.pad_value
        crops = SegCrops(
            self.labeled,
            d.patch,
            self.lookup,
            svda,
            pad,
            cfg.seed,
            1,
            foreground=d.foreground_fraction,
        )
        self._labeled = batch_stream(crops, batch, start, steps - start, d.workers, env)
        self._unlabeled = None
        if method.uses_unlabeled:
            # unlabeled crop i·batch.. feeds step i (BCP draws none while it pre-trains)
            first = method.unlabeled_start(start)
            strong = isinstance(method, SegmentationMethod) and method.strong_view
            unlabeled = SegCrops(
                self.unlabeled,
                d.patch,
                self.lookup,
                svda,
                pad,
                cfg.seed,
                2,
                weak_strong=strong,
                layout=self.layout,
            )
            self._unlabeled = batch_stream(unlabeled, batch, first, steps - first, d.workers, env)

    def _next_unlabeled(self) -> dict[str, torch.Tensor]:
        if self._unlabeled is None:
            raise MedsslError(f"{self.cfg.method} drew an unlabeled batch it did not declare")
        return to_device(next(self._unlabeled), self.device)

    def batch(self, step: int) -> Batch:
        seed = np.random.default_rng([self.cfg.seed, 5, step, self.env.rank]).integers(2**62)
        generator = torch.Generator().manual_seed(int(seed))
        labeled = to_device(next(self._labeled), self.device)
        if self.ce_weights is not None:
            labeled["ce_weights"] = self.ce_weights.to(self.device)
        return Batch(labeled, self._next_unlabeled, generator=generator)

    def provenance(self) -> dict[str, Any]:
        return self._provenance

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"classes": {str(k): v for k, v in self.names.items()}}

    def validate(self, network: torch.nn.Module) -> dict[str, float] | None:
        if not self.validation:
            return None
        return validate_segmenter(
            network, self.validation, self.lookup, self.params, self.device, self.cfg.amp
        )

    def finish(self, manager: CheckpointManager) -> SegmentationRun:
        if not self.env.is_main:
            return SegmentationRun(self.out, manager.latest() or self.out, None)
        best = manager.best() or manager.latest()
        assert best is not None
        net = place(inference_net(manager.load(best)), self.device)
        split, cfg = self.split, self.cfg
        report = (
            test_segmenter(
                net,
                split.test,
                self.lookup,
                self.params,
                self.names,
                self.device,
                cfg.amp,
                self.out / "test",
            )
            if split.test
            else None
        )
        return SegmentationRun(self.out, best, report)


def train_segmenter(
    cfg: SegmentationExperiment,
    data: str | Path,
    out: str | Path,
    resume: bool = False,
    device: str | None = None,
) -> SegmentationRun:
    """Train (or resume) a segmentation run and test it on the test domains.

    Args:
        cfg: the validated experiment; ``cfg.method`` picks the method, ``cfg.data`` the setting.
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
        task = SegmentationTask(cfg, Path(data), Path(out), env, dev)
        return fit(task, load_method(cfg.method)(cfg, task), resume)
    finally:
        cleanup()
