"""Checkpoints that survive a crash mid-write, keep the best model, and resume exactly.

Layout under ``run_dir/checkpoints/``::

    step_00001000.pt   the last ``keep_last`` saves (older ones are pruned)
    last.pt            the newest save (hard link, or a copy where links are unsupported)
    best.pt            the save with the best ``metrics[metric]`` so far
    index.json         {"metric", "mode", "last_step", "best_step", "best_value",
                        "steps": [retained step files], "history": [{"step", "metrics"}]}

Every file is written to a temporary name in the same folder, fsynced, then renamed with
``os.replace``: a reader sees the old file or the new one, never half of one.

What a checkpoint holds is :data:`SCHEMA_VERSION` of the schema in
``docs/reference/checkpoint.md``: :class:`CheckpointKind` names the model type, ``method`` holds
the training method's own state and ``data`` the sampler's; :func:`migrate` brings a checkpoint of
an older schema (read back by :func:`load_checkpoint`) to the current one.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from medssl.atomic import atomic_write, fsync_dir
from medssl.errors import CheckpointError, MedsslError

__all__ = [
    "SCHEMA_VERSION",
    "CheckpointKind",
    "CheckpointManager",
    "load_checkpoint",
    "migrate",
    "resume_from_last",
    "rng_state",
    "set_rng_state",
]

#: The checkpoint layout :class:`CheckpointManager` users write (``state["schema"]``).
#: 1: no ``schema`` key; method state at the top level (``teacher``, ``drs``, ``bcp``,
#: ``threshold``, ``patchcl``; detection: ``threshold``, ``mined``). 2: ``method`` and ``data``.
SCHEMA_VERSION = 2


class CheckpointKind(Enum):
    """What a checkpoint's ``model`` weights are (``state["kind"]``; ``medssl-export`` dispatches
    on it). Accepts the value string: ``CheckpointKind("medssl.detector")``."""

    DETECTOR = "medssl.detector"
    SEGMENTER = "medssl.segmenter"


#: Schema 1's top-level method entries of each kind, moved under ``method`` by :func:`migrate`.
_V1_METHOD_KEYS = {
    CheckpointKind.SEGMENTER: ("teacher", "drs", "bcp", "threshold", "patchcl"),
    CheckpointKind.DETECTOR: ("threshold",),
}


def migrate(state: Mapping[str, Any], path: str | Path = "<checkpoint>") -> dict[str, Any]:
    """``state`` in the current schema (:data:`SCHEMA_VERSION`); a copy, the input is unchanged.

    Schema 1 (no ``schema`` key) moves its method entries that are not None under ``method``
    and the detector's ``mined`` lists to ``data``; ``kind`` stays the same string.

    Raises:
        CheckpointError: ``kind`` is missing or unknown, or ``schema`` is newer than this code.
    """
    out = dict(state)
    try:
        kind = CheckpointKind(out.get("kind"))
    except ValueError:
        known = ", ".join(k.value for k in CheckpointKind)
        raise CheckpointError(
            Path(path),
            f"unknown checkpoint kind {out.get('kind')!r} (expected one of {known}); "
            "only checkpoints written by medssl-train load here",
        ) from None
    version = int(out.get("schema", 1))
    if version > SCHEMA_VERSION:
        raise CheckpointError(
            Path(path),
            f"checkpoint schema {version} is newer than this medssl's ({SCHEMA_VERSION}); "
            "upgrade medssl to read it",
        )
    if version == 1:
        method = {k: out.pop(k) for k in _V1_METHOD_KEYS[kind] if k in out}
        out["method"] = {k: v for k, v in method.items() if v is not None}
        out["data"] = dict(out.pop("mined", None) or {})
        out["schema"] = SCHEMA_VERSION
    return out


_STEP_FILE = re.compile(r"^step_(\d{8,})\.pt$")


def _atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` the same content as ``src`` atomically: a hard link, else a copy."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links on this filesystem: copy instead
        with open(src, "rb") as source:
            atomic_write(dst, lambda fh: shutil.copyfileobj(source, fh))
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)


def _to_float(value: Any) -> float:
    """A metric value (float, numpy scalar, 1-element tensor) as a Python float."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().cpu().item())
    return float(value)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :class:`CheckpointManager` (or ``torch.save`` of a dict).

    Uses ``weights_only=False``: only load files your own runs wrote.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, or does not hold a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(
            path,
            f"cannot read checkpoint, the file is truncated or corrupt ({type(exc).__name__}: "
            f"{exc}); delete it and resume from an earlier step_*.pt",
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(path, f"expected a dict checkpoint, found {type(state).__name__}")
    return state


class CheckpointManager:
    """Save, prune and find the checkpoints of one run.

    Args:
        run_dir: the run's folder; checkpoints go to ``run_dir/checkpoints``.
        keep_last: how many ``step_*.pt`` files to keep (``last.pt``/``best.pt`` are extra).
        metric: key of ``metrics`` that decides ``best.pt`` (e.g. ``"cpm"``, ``"val_loss"``).
        mode: ``"max"`` if larger is better, ``"min"`` if smaller is.

    A manager opened on an existing run reads ``index.json``, so the best value survives a
    restart. In a DDP run only rank 0 should save (the others would race on the same files).
    """

    def __init__(
        self,
        run_dir: str | Path,
        keep_last: int = 3,
        metric: str = "cpm",
        mode: Literal["max", "min"] = "max",
    ) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self.metric = metric
        self.mode = mode
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index = self._read_index()

    # -- index ------------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.dir / "index.json"

    def _read_index(self) -> dict[str, Any]:
        empty: dict[str, Any] = {
            "metric": self.metric,
            "mode": self.mode,
            "last_step": None,
            "best_step": None,
            "best_value": None,
            "steps": [],
            "history": [],
        }
        if not self.index_path.is_file():
            empty["steps"] = self._step_files_on_disk()
            empty["last_step"] = empty["steps"][-1] if empty["steps"] else None
            return empty
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(self.index_path, f"unreadable checkpoint index: {exc}") from exc
        if index.get("metric") != self.metric or index.get("mode") != self.mode:
            # A different metric makes the old best value meaningless: start best afresh.
            index.update(metric=self.metric, mode=self.mode, best_step=None, best_value=None)
        return {**empty, **index}

    def _step_files_on_disk(self) -> list[int]:
        steps = []
        for p in self.dir.iterdir():
            m = _STEP_FILE.match(p.name)
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def _write_index(self) -> None:
        text = json.dumps(self._index, indent=2, allow_nan=False).encode("utf-8")
        atomic_write(self.index_path, lambda fh: fh.write(text))

    @property
    def index(self) -> dict[str, Any]:
        """A copy of what ``index.json`` holds."""
        return json.loads(json.dumps(self._index))

    def step_path(self, step: int) -> Path:
        """``run_dir/checkpoints/step_{step:08d}.pt``."""
        return self.dir / f"step_{step:08d}.pt"

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        best = self._index["best_value"]
        if best is None:
            return True
        return value > best if self.mode == "max" else value < best

    # -- API --------------------------------------------------------------------------------
    def save(
        self, state: Mapping[str, Any], step: int, metrics: Mapping[str, Any] | None = None
    ) -> Path:
        """Write ``state`` as ``step_{step:08d}.pt``; update ``last.pt``, ``best.pt``, the index.

        Args:
            state: what to save (model/optimizer state dicts, ``rng_state()``, the config...).
            step: the global optimisation step, >= 0.
            metrics: scalars measured at this step; ``best.pt`` moves here when
                ``metrics[metric]`` beats the best so far (NaN never does). Without the
                metric, ``best.pt`` is left alone. Non-finite values are recorded as
                ``null`` in ``index.json`` (strict JSON).

        Returns:
            The path of the step file.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        path = self.step_path(step)
        atomic_write(path, lambda fh: torch.save(dict(state), fh))
        _atomic_link(path, self.dir / "last.pt")
        plain = {str(k): _to_float(v) for k, v in (metrics or {}).items()}
        if self.metric in plain and self._improves(plain[self.metric]):
            _atomic_link(path, self.dir / "best.pt")
            self._index["best_step"] = step
            self._index["best_value"] = plain[self.metric]
        history = [h for h in self._index["history"] if h["step"] != step]
        finite = {k: (v if math.isfinite(v) else None) for k, v in plain.items()}
        self._index["history"] = [*history, {"step": step, "metrics": finite}]
        self._index["last_step"] = step
        steps = sorted({*self._index["steps"], step})
        for old in steps[: -self.keep_last]:
            self.step_path(old).unlink(missing_ok=True)
        self._index["steps"] = steps[-self.keep_last :]
        self._write_index()
        return path

    def latest(self) -> Path | None:
        """``last.pt``, the newest save, or None before the first save."""
        path = self.dir / "last.pt"
        return path if path.is_file() else None

    def best(self) -> Path | None:
        """``best.pt``, the save with the best metric, or None if no save had the metric."""
        path = self.dir / "best.pt"
        return path if path.is_file() else None

    def load(self, path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
        """:func:`load_checkpoint`: the saved dict, or CheckpointError naming the file."""
        return load_checkpoint(path, map_location)


def resume_from_last(
    manager: CheckpointManager,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Load ``last.pt`` into the model, optimiser, scheduler and the global RNGs.

    Returns:
        The checkpoint in the current schema (:func:`migrate`), for the rest of the state
        (``step``, ``method``, ``data``).

    Raises:
        MedsslError: the run folder has no checkpoint to resume.
    """
    last = manager.latest()
    if last is None:
        raise MedsslError(f"{manager.run_dir}: nothing to resume (no checkpoints/last.pt)")
    state = migrate(manager.load(last), last)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


# -- RNG state ----------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The state of every global RNG a training step draws from, for exact resume.

    Keys: ``python`` (:mod:`random`), ``numpy`` (legacy global ``np.random``), ``torch``
    (CPU generator, uint8 tensor) and ``cuda`` (list, one per visible GPU; absent without CUDA).
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured.

    CUDA states are restored only when present and CUDA is available (a CPU resume of a GPU
    run restores the CPU generators and skips the GPU ones).
    """
    missing = {"python", "numpy", "torch"} - set(state)
    if missing:
        raise ValueError(f"RNG state lacks {sorted(missing)}; expected a dict from rng_state()")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
        for i, s in enumerate(cuda_states):
            torch.cuda.set_rng_state(torch.as_tensor(s, dtype=torch.uint8).cpu(), i)
