"""Training logs: TensorBoard scalars, a JSON-lines file, and progress on stderr.

``run_dir/tensorboard/`` holds the event files (``tensorboard --logdir run_dir``);
``run_dir/log.jsonl`` holds one ``{"step": ..., "time": ..., <scalar>: ...}`` object per
:meth:`TrainLogger.log` call, for scripts and tests. On a terminal, progress is a rich bar
(step/total, it/s, ETA, latest loss); when stderr is not a TTY (CI, ``nohup``, Slurm) a plain
line is printed every ``print_every`` steps instead, so logs stay readable.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch.utils.tensorboard import SummaryWriter
from typing_extensions import Self

__all__ = ["TrainLogger", "format_postfix"]


def _scalar(value: Any) -> float:
    """A float, numpy scalar or 1-element tensor as a Python float."""
    item = getattr(value, "item", None)
    return float(item() if callable(item) else value)


def format_postfix(values: dict[str, Any]) -> str:
    """``{"loss": 0.123456, "lr": 1e-4}`` → ``"loss=0.1235 lr=0.0001"``."""
    parts = []
    for k, v in values.items():
        try:
            parts.append(f"{k}={_scalar(v):.4g}")
        except (TypeError, ValueError):
            parts.append(f"{k}={v}")
    return " ".join(parts)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class _RateColumn(ProgressColumn):
    """Iterations per second, from rich's own speed estimate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("? it/s" if speed is None else f"{speed:.2f} it/s", style="progress.data.speed")


def _step_of(line: str) -> float:
    """The ``step`` of a ``log.jsonl`` line; a line cut off mid-write (the process was killed)
    counts as past every step, so it is dropped."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


class TrainLogger:
    """Log scalars and show progress for one run.

    Args:
        run_dir: the run's folder (created if missing).
        total_steps: the step count the run ends at (for the bar and the ETA).
        enabled: ``False`` on non-zero DDP ranks: every method does nothing, no file is made.
        print_every: when stderr is not a TTY, print a plain progress line every this many
            steps (and at the last step).
        stream: where progress goes; default ``sys.stderr``.
        tty: force the rich bar (``True``) or plain lines (``False``); default
            ``stream.isatty()``.
        resume_step: the step a resumed run continues from: what an interrupted process logged
            after it (past its last checkpoint, so about to be redone) is dropped from
            ``log.jsonl``, and TensorBoard purges it (``purge_step``), so every step is logged
            once. None: a fresh run, or nothing to drop.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        enabled: bool = True,
        *,
        print_every: int = 50,
        stream: IO[str] | None = None,
        tty: bool | None = None,
        resume_step: int | None = None,
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if isinstance(print_every, bool) or not isinstance(print_every, int) or print_every < 1:
            raise ValueError(f"print_every must be an int >= 1, got {print_every!r}")
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.enabled = enabled
        self.print_every = print_every
        self._stream = stream if stream is not None else sys.stderr
        self._tty = bool(tty) if tty is not None else bool(getattr(self._stream, "isatty", bool)())
        self._start: tuple[int, float] | None = None
        self._last_printed: int | None = None
        self._progress: Progress | None = None
        self._task: Any = None
        self._writer: SummaryWriter | None = None
        self._jsonl: IO[str] | None = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(
            log_dir=str(self.run_dir / "tensorboard"),
            purge_step=None if resume_step is None else resume_step + 1,
        )
        if resume_step is not None and self.jsonl_path.is_file():
            kept = [
                line
                for line in self.jsonl_path.read_text(encoding="utf-8").splitlines(keepends=True)
                if _step_of(line) <= resume_step
            ]
            self.jsonl_path.write_text("".join(kept), encoding="utf-8")
        # Held open for the logger's lifetime (closed in close()); line-buffered.
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    @property
    def jsonl_path(self) -> Path:
        return self.run_dir / "log.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / "tensorboard"

    def log(self, step: int, **scalars: Any) -> None:
        """Record scalars at ``step``: TensorBoard tags named like the keywords and one JSON line.

        Values may be floats, ints, numpy scalars or 1-element tensors. Non-finite values
        are written to the JSON line as ``null``.
        """
        if not self.enabled or self._writer is None or self._jsonl is None:
            return
        values = {k: _scalar(v) for k, v in scalars.items()}
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")

    def advance(self, step: int, **postfix: Any) -> None:
        """Show that ``step`` steps are done; ``postfix`` (e.g. ``loss=...``) is shown beside.

        ``step`` is the absolute global step, so a resumed run continues the bar where it
        stopped; the it/s and ETA count from the first ``advance`` of this process.
        """
        if not self.enabled:
            return
        now = time.monotonic()
        if self._start is None:
            self._start = (step, now)
        if self._tty:
            self._advance_bar(step, postfix)
        elif (
            step % self.print_every == 0 or step >= self.total_steps
        ) and step != self._last_printed:
            self._last_printed = step
            print(self._plain_line(step, now, postfix), file=self._stream, flush=True)

    def _plain_line(self, step: int, now: float, postfix: dict[str, Any]) -> str:
        assert self._start is not None
        first_step, t0 = self._start
        elapsed = now - t0
        rate = (step - first_step) / elapsed if elapsed > 0 and step > first_step else math.nan
        eta = (self.total_steps - step) / rate if rate and math.isfinite(rate) else math.nan
        pct = 100.0 * step / self.total_steps
        rate_text = "?" if not math.isfinite(rate) else f"{rate:.2f}"
        line = (
            f"step {step}/{self.total_steps} ({pct:.0f}%) | {rate_text} it/s | "
            f"elapsed {_duration(elapsed)} | ETA {_duration(eta)}"
        )
        extra = format_postfix(postfix)
        return f"{line} | {extra}" if extra else line

    def _advance_bar(self, step: int, postfix: dict[str, Any]) -> None:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                _RateColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[postfix]}"),
                console=Console(file=self._stream),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=self.total_steps, completed=step, postfix=""
            )
        self._progress.update(self._task, completed=step, postfix=format_postfix(postfix))

    def close(self) -> None:
        """Stop the bar and flush and close the files. Safe to call twice."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
