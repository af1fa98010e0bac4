"""The one training loop: seeding, DDP, AMP, divergence, logging, validation and checkpoints.

A run is two objects (as MONAI's ``SupervisedTrainer(iteration_update=...)`` and nnU-Net v2's
trainer variants, which override one hook):

* a :class:`Task` (:mod:`medssl.training.segmentation.trainer`,
  :mod:`medssl.training.detection.trainer`): the data (split, cache, batch streams), validation,
  the test at the end, and what a checkpoint says about the data;
* a :class:`~medssl.training.methods.base.Method` (:mod:`medssl.training.methods`): its
  networks, optimiser, state and one optimisation ``step``.

Per step the loop draws the step's batch from the task, runs ``method.step`` under autocast,
stops on a non-finite loss (:class:`TrainingDivergedError`, the last good checkpoint stays),
steps the optimiser and scheduler, calls ``method.after_step`` (EMA teachers) and logs; every
``eval.every`` steps, at the end, and where the method asks, it validates on rank 0 and saves a
checkpoint (``docs/reference/checkpoint.md``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from medssl.config import config_to_dict
from medssl.errors import MedsslError
from medssl.training.checkpoint import (
    SCHEMA_VERSION,
    CheckpointKind,
    CheckpointManager,
    resume_from_last,
    rng_state,
)
from medssl.training.distributed import DistEnv
from medssl.training.logger import TrainLogger
from medssl.training.methods.base import Batch, Method
from medssl.training.seed import seed_everything

__all__ = ["Task", "TrainingDivergedError", "autocast", "fit"]


class TrainingDivergedError(MedsslError):
    """The loss stopped being finite; the last good checkpoint is kept."""


def autocast(enabled: bool, device: torch.device) -> AbstractContextManager[Any]:
    """bfloat16 autocast on a GPU when ``enabled`` (the config's ``amp``); else nothing."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class Task(ABC):
    """What a kind of model brings to the loop: data, validation, test, checkpoint fields.

    Attributes:
        cfg: the experiment (``seed``, ``amp``, ``optim.steps``, ``eval.every`` are read here).
        out: the run folder.
        env, device: this process's place in a DDP run and its device.
        kind: the checkpoints' :class:`CheckpointKind`.
        metric: the validation metric that picks ``best.pt`` (larger is better).
        grad_clip: clip the gradients' total norm to this before each optimiser step (0: off).
    """

    kind: CheckpointKind
    metric: str
    grad_clip: float = 0.0

    def __init__(self, cfg: Any, out: Path, env: DistEnv, device: torch.device) -> None:
        self.cfg, self.out, self.env, self.device = cfg, out, env, device
        self.amp = autocast(cfg.amp, device)

    @abstractmethod
    def prepare(self, method: Method) -> None:
        """Split and cache the data ``method`` trains on; on rank 0 write the run folder's
        ``config.yaml`` and ``split.json``. Runs after seeding, before the method builds."""

    @abstractmethod
    def open_streams(self, start: int, method: Method) -> None:
        """Start the batch streams at step ``start`` (0, or the resumed step)."""

    @abstractmethod
    def batch(self, step: int) -> Batch:
        """The input of 0-based ``step``."""

    @abstractmethod
    def provenance(self) -> dict[str, Any]:
        """What the checkpoints (and so the model cards) record about the data."""

    @abstractmethod
    def validate(self, network: torch.nn.Module) -> dict[str, float] | None:
        """Validation metrics of the plain (unwrapped) ``network``, or None without validation
        cases. Called on rank 0 only; leaves the network in train mode."""

    @abstractmethod
    def finish(self, manager: CheckpointManager) -> Any:
        """The run's result after the last step (the test of the best checkpoint on rank 0)."""

    def before_validation(self, network: torch.nn.Module) -> None:  # noqa: B027 - an optional hook: doing nothing is the default
        """Runs on every rank before each validation and checkpoint (detection re-estimates
        BatchNorm statistics here)."""

    def after_validation(self, step: int, method: Method) -> dict[str, float]:
        """Runs on every rank after validation at ``step`` completed steps; returns scalars to log
        (detection mines hard negatives and candidates here and restarts its streams)."""
        return {}

    def checkpoint_fields(self) -> dict[str, Any]:
        """Extra top-level checkpoint entries of this kind (segmentation: ``classes``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The data samplers' state a resumed run needs (checkpoint ``data``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - an optional hook: doing nothing is the default
        """Restore :meth:`state_dict` (after :meth:`prepare`)."""


def _checkpoint(
    task: Task, method: Method, step: int, metrics: dict[str, float] | None
) -> dict[str, Any]:
    """The checkpoint at ``step`` completed steps (schema: ``docs/reference/checkpoint.md``)."""
    assert method.optimizer is not None and method.scheduler is not None
    return {
        "schema": SCHEMA_VERSION,
        "kind": task.kind.value,
        "model": method.network.state_dict(),
        "optimizer": method.optimizer.state_dict(),
        "scheduler": method.scheduler.state_dict(),
        "config": config_to_dict(task.cfg),
        "step": step,
        "rng": rng_state(),
        **task.checkpoint_fields(),
        "provenance": task.provenance(),
        "metrics": dict(metrics or {}),
        "method": method.state_dict(),
        "data": task.state_dict(),
    }


def fit(task: Task, method: Method, resume: bool = False) -> Any:
    """Train ``method`` on ``task`` (or resume from ``task.out/checkpoints/last.pt``) and return
    ``task.finish``'s result.

    Raises:
        TrainingDivergedError: the loss became NaN/inf (the last good checkpoint stays).
        MedsslError: ``resume`` without a checkpoint, or what the task and method raise.
    """
    cfg, env = task.cfg, task.env
    seed_everything(cfg.seed + env.rank)
    task.prepare(method)
    manager = CheckpointManager(task.out, metric=task.metric)
    method.build(task.device)
    method.optimizer, method.scheduler = method.optimiser()
    start = 0
    if resume:
        state = resume_from_last(manager, method.network, method.optimizer, method.scheduler)
        try:
            method.load_state_dict(state["method"])
        except MedsslError as exc:  # name the run whose checkpoint does not fit
            raise MedsslError(f"{task.out}: {exc}") from exc
        task.load_state_dict(state["data"])
        start = int(state["step"])
    method.start(env, resumed=resume)
    task.open_streams(start, method)
    optimizer, scheduler = method.optimizer, method.scheduler
    steps, every = cfg.optim.steps, cfg.eval.every
    with TrainLogger(
        task.out, steps, enabled=env.is_main, resume_step=start if resume else None
    ) as logger:
        for step in range(start, steps):
            method.before_step(step)
            batch = task.batch(step)
            with task.amp:
                losses = method.step(step, batch)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"loss became {loss.item()} at step {step}; stopping. The last good checkpoint "
                    f"({manager.latest() or 'none yet'}) is kept; lower optim.lr or check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if task.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(method.model.parameters(), task.grad_clip)
            optimizer.step()
            scheduler.step()
            method.after_step(step)
            scalars = {k: float(v.detach()) for k, v in losses.items()}
            logger.log(step + 1, lr=scheduler.get_last_lr()[0], **scalars)
            logger.advance(step + 1, loss=scalars["loss"])
            done = step + 1
            if done % every == 0 or done == steps or method.evaluation_due(done):
                task.before_validation(method.network)
                metrics = task.validate(method.network) if env.is_main else None
                metrics = method.on_validation(done, metrics)
                extra = task.after_validation(done, method)
                if env.is_main:
                    if metrics:
                        logger.log(done, **{f"val/{k}": v for k, v in metrics.items()})
                    if extra:
                        logger.log(done, **extra)
                    manager.save(_checkpoint(task, method, done, metrics), done, metrics)
    return task.finish(manager)
