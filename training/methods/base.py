"""What a training method is: one object the loop (:func:`medssl.training.loop.fit`) drives.

A method builds its networks (:meth:`Method.build`), says how they are optimised
(:meth:`Method.optimiser`), saves and restores everything beyond the exported network's weights
(:meth:`Method.state_dict`, the checkpoint's ``method`` entry), and runs one optimisation step
(:meth:`Method.step`: loss terms, the loop does backward and the optimiser) followed by
:meth:`Method.after_step` (EMA teachers). The other hooks have defaults a method overrides only
when it needs them, as an nnU-Net trainer variant overrides one hook.

:class:`SegmentationMethod` and :class:`DetectionMethod` are the two families' defaults (the
network of the experiment, its optimiser and schedule); :class:`TeacherMethod` adds an EMA
teacher to a segmentation method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from medssl.training.distributed import DistEnv, unwrap, wrap_ddp
from medssl.training.methods.registry import REGISTRY
from medssl.training.networks.detector import FPNDetector
from medssl.training.networks.segmenter import build_segmenter, place

if TYPE_CHECKING:
    from medssl.detection import AnchorGrid
    from medssl.training.cache import CachedVolume
    from medssl.training.detection.config import DetectionExperiment
    from medssl.training.detection.mining import NoduleTruth
    from medssl.training.segmentation.config import SegmentationExperiment
    from medssl.training.threshold import VoxelMemoryLayout

__all__ = [
    "Batch",
    "DetectionData",
    "DetectionMethod",
    "Method",
    "SegmentationData",
    "SegmentationMethod",
    "TeacherMethod",
    "ema_update",
    "load_method",
]

Scheduler = torch.optim.lr_scheduler.LRScheduler


@dataclass
class Batch:
    """One step's input.

    Attributes:
        labeled: the labeled batch on the training device (the task's layout: segmentation
            ``image (B, 1, Z, Y, X)``, ``label (B, Z, Y, X)`` and optional ``ce_weights (C,)``;
            detection :mod:`medssl.training.detection.data`).
        draw_unlabeled: the next unlabeled batch, on the device; only methods that train on
            unlabeled data call it (through :meth:`unlabeled`), once per step.
        generator: the step's torch generator (segmentation), a function of (seed, step, rank).
        rng: the step's numpy generator (detection), a function of (seed, step, rank).
    """

    labeled: dict[str, torch.Tensor]
    draw_unlabeled: Callable[[], dict[str, torch.Tensor]]
    generator: torch.Generator | None = None
    rng: np.random.Generator | None = None

    def unlabeled(self) -> dict[str, torch.Tensor]:
        """The step's unlabeled batch (drawn from the task's unlabeled stream)."""
        return self.draw_unlabeled()


class Method(ABC):
    """A training method plugged into the loop.

    Attributes:
        uses_unlabeled: the method trains on unlabeled data (the task then caches and streams
            it, and refuses to start without it).
        cfg: the experiment.
        model: the trained network, DDP-wrapped after :meth:`start`; :attr:`network` is the plain
            module (what checkpoints and export hold).
        optimizer, scheduler: set by the loop from :meth:`optimiser`.
    """

    uses_unlabeled: ClassVar[bool] = True

    def __init__(self, cfg: Any, data: Any) -> None:
        self.cfg = cfg
        self.data = data
        self.model: nn.Module = nn.Identity()
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Scheduler | None = None

    @property
    def network(self) -> nn.Module:
        """The trained network without its DDP wrapper."""
        return unwrap(self.model)

    @abstractmethod
    def build(self, device: torch.device) -> None:
        """Create the networks (and other state) on ``device``; the global RNG is seeded."""

    @abstractmethod
    def optimiser(self) -> tuple[torch.optim.Optimizer, Scheduler]:
        """The optimiser of the trainable parameters and its per-step schedule."""

    @abstractmethod
    def step(self, step: int, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimisation step's loss terms at 0-based ``step``; ``"loss"`` is minimised and
        every term is logged."""

    def state_dict(self) -> dict[str, Any]:
        """The method's state beside the network, optimiser and scheduler (checkpoint
        ``method``): teachers, heads, queues, threshold memories..."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - an optional hook: doing nothing is the default
        """Restore :meth:`state_dict` (after :meth:`build`, before :meth:`start`)."""

    def start(self, env: DistEnv, resumed: bool) -> None:
        """Ready the networks for the first step: wrap the trained ones for DDP, train mode."""
        self.model = wrap_ddp(self.model, env)
        self.model.train()

    def before_step(self, step: int) -> None:  # noqa: B027 - an optional hook: doing nothing is the default
        """Runs before ``step``'s batch is drawn (phase switches)."""

    def after_step(self, step: int) -> None:  # noqa: B027 - an optional hook: doing nothing is the default
        """Runs after ``step``'s optimiser step (EMA updates)."""

    def evaluation_due(self, done: int) -> bool:
        """Validate and checkpoint after ``done`` steps besides ``eval.every`` and the end."""
        return False

    def on_validation(self, done: int, metrics: dict[str, float] | None) -> dict[str, float] | None:
        """See the validation ``metrics`` after ``done`` steps (None on ranks > 0 or without
        validation cases); returns what is logged and checkpointed."""
        return metrics

    def unlabeled_start(self, start: int) -> int:
        """The first step that draws an unlabeled batch, for a run starting at ``start``."""
        return start


class SegmentationData(Protocol):
    """What a segmentation method reads from its task."""

    n_classes: int
    layout: VoxelMemoryLayout | None


class DetectionData(Protocol):
    """What a detection method reads from its task."""

    grid: AnchorGrid
    truth: NoduleTruth | None
    unlabeled: list[CachedVolume]


def _poly(step: int, total: int, power: float) -> float:
    return (1 - step / total) ** power


class SegmentationMethod(Method):
    """A segmentation method's defaults: the experiment's network (:func:`build_segmenter`),
    SGD with Nesterov and the poly lr (official A&D ``train_diffusion.py``).

    Attributes:
        strong_view: unlabeled crops carry a strong view (``SegCrops(weak_strong=True)``).
    """

    strong_view: ClassVar[bool] = False
    cfg: SegmentationExperiment
    data: SegmentationData

    def build(self, device: torch.device) -> None:
        self.model = place(build_segmenter(self.cfg, self.data.n_classes), device)

    def parameters(self) -> list[nn.Parameter]:
        """The optimised parameters."""
        return list(self.network.parameters())

    def optimiser(self) -> tuple[torch.optim.Optimizer, Scheduler]:
        o = self.cfg.optim
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=o.lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            nesterov=True,
        )
        return optimizer, torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: _poly(s, o.steps, o.poly_power)
        )


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher ← decay·teacher + (1 − decay)·student, over parameters only (SSL4MIS
    ``update_ema_variables``): the teacher runs in train mode, so its BatchNorm uses batch
    statistics and keeps its own running statistics."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)


class TeacherMethod(SegmentationMethod):
    """A segmentation method with an EMA teacher of the same network: built after the student,
    a copy of it on a fresh start, in train mode without gradients, updated by
    :func:`ema_update` with :attr:`ema` after every step (checkpoint ``method.teacher``)."""

    @property
    @abstractmethod
    def ema(self) -> float:
        """The teacher's decay."""

    def build(self, device: torch.device) -> None:
        super().build(device)
        self.teacher = place(build_segmenter(self.cfg, self.data.n_classes), device)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])

    def start(self, env: DistEnv, resumed: bool) -> None:
        if not resumed:
            self.teacher.load_state_dict(self.model.state_dict())
        self.teacher.train()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        super().start(env, resumed)

    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.network, self.ema)


class DetectionMethod(Method):
    """A detection method's defaults: the FPN detector, Adam and a cosine schedule."""

    cfg: DetectionExperiment
    data: DetectionData

    def build(self, device: torch.device) -> None:
        self.model = FPNDetector(self.cfg.model, self.cfg.anchors).to(device)

    def optimiser(self) -> tuple[torch.optim.Optimizer, Scheduler]:
        o = self.cfg.optim
        optimizer = torch.optim.Adam(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=o.steps)


def load_method(name: str) -> type[Method]:
    """The :class:`~medssl.training.methods.base.Method` class registered as ``name``.

    Raises:
        KeyError: ``name`` is not registered (the message lists the methods).
    """
    try:
        entry = REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown training method {name!r}; known: {', '.join(REGISTRY)}") from None
    module, cls = entry.target.split(":")
    return getattr(import_module(f"medssl.training.methods.{module}"), cls)
