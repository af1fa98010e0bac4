"""``medssl-score``'s engine-independent driver: manifest → selection → engine → result store.

The engines (:mod:`medssl.scoring.local`, :mod:`medssl.scoring.ray_engine`) only turn
:class:`ScanItem` rows into :class:`Scored` results; this module decides what to run,
commits every result as it arrives (so a killed run loses only what was in flight), and
writes the final tables.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from medssl.errors import MedsslError
from medssl.io.limits import DEFAULT_LIMITS, GeometryLimits
from medssl.models.card import ModelCard, Task, warn_without_operating_point
from medssl.scoring.manifest import Layout, ScanItem, build_manifest
from medssl.scoring.select import SelectionRules, select_series
from medssl.scoring.shard import Shard
from medssl.scoring.series import DicomOutput, Scored, skipped_row
from medssl.scoring.store import ResultStore, write_unreadable

__all__ = ["Engine", "Progress", "RunnerSpec", "ScoreOptions", "ScoreSummary", "score"]


@dataclass(frozen=True)
class RunnerSpec:
    """How to open the model, picklable so workers and Ray actors open their own runner.

    Attributes:
        repository: the model repository (the card is read from here).
        name: the model's name.
        version: a version, or None for the newest.
        triton_url: ``host:port`` of a Triton server; None runs onnxruntime in-process.
        protocol: ``http`` or ``grpc`` with ``triton_url``.
        threads: inference threads of the embedded runtime (None: its default).
        runtime: the embedded runtime, ``auto`` (OpenVINO on a CPU when installed, onnxruntime
            with a GPU), ``onnxruntime`` or ``openvino`` (:func:`medssl.runners.choose_runtime`).
    """

    repository: Path
    name: str
    version: int | None = None
    triton_url: str | None = None
    protocol: str = "http"
    threads: int | None = None
    runtime: str = "auto"

    def open(self) -> Any:
        """The runner (:func:`medssl.runners.open_runner`)."""
        from medssl.runners import open_runner

        extra = {"threads": self.threads} if self.triton_url is None and self.threads else {}
        return open_runner(self.repository, self.name, triton_url=self.triton_url, protocol=self.protocol,
                           version=self.version, runtime=self.runtime, **extra)

    def card(self) -> ModelCard:
        from medssl.models.repository import find_model_version

        return find_model_version(self.repository, self.name, self.version).card


@dataclass(frozen=True)
class ScoreOptions:
    """How to run.

    Attributes:
        engine: ``local`` (process pool + in-process model) or ``ray``.
        workers: read/preprocess workers (local: processes, 0 = in the main process; ray:
            CPU tasks in flight).
        batch_size: windows per model call.
        limit: score at most this many series (after selection and resume).
        ray_address: an existing Ray cluster (``auto``), or None for a local one.
        ray_num_gpus: GPUs per inference actor (ray engine).
        dicom: write a TID 1500 SR (detection) or DICOM SEG (segmentation) for each scored
            DICOM series (:class:`~medssl.scoring.series.DicomOutput`); None writes none.
        label_maps: segmentation label maps folder; :func:`score` sets ``OUT/labels``.
        limits: the plausible geometry of a series (:mod:`medssl.io.limits`); a series beyond
            them fails with the value and the limit before its pixels are read, which bounds
            the memory one series may take.
        ray_chunk: series per Ray dataset (ray engine): the manifest is fed to Ray in chunks
            of this many series, one block per series within a chunk, so planning time and
            the driver's object-store footprint stay bounded whatever the archive size.
        shard: score only this shard of the manifest (:mod:`medssl.scoring.shard`), so N
            machines share an archive; None scores all of it.
    """

    engine: str = "local"
    workers: int = max(1, (os.cpu_count() or 2) - 1)
    batch_size: int = 2
    limit: int | None = None
    ray_address: str | None = None
    ray_num_gpus: float = 0.0
    dicom: DicomOutput | None = None
    label_maps: Path | None = None
    limits: GeometryLimits = DEFAULT_LIMITS
    ray_chunk: int = 512
    shard: Shard | None = None

    def __post_init__(self) -> None:
        if self.engine not in ("local", "ray"):
            raise MedsslError(f"engine must be 'local' or 'ray', got {self.engine!r}")
        if self.workers < 0 or self.batch_size < 1 or self.ray_chunk < 1:
            raise MedsslError("workers must be >= 0, batch_size >= 1 and ray_chunk >= 1")


class Engine(Protocol):
    """Turns manifest rows into results, in any order, one per row."""

    def __call__(self, items: Sequence[ScanItem], spec: RunnerSpec, card: ModelCard,
                 options: ScoreOptions) -> Iterator[Scored]: ...


Progress = Callable[[int, int, dict[str, int]], None]


@dataclass
class ScoreSummary:
    """What a run did.

    Attributes:
        total: series in the manifest (in the shard, with ``ScoreOptions.shard``).
        counts: rows per status in the store after the run (``ok``, ``skipped``, ``failed``).
        scored_now: series run through the model in this run.
        resumed: series skipped because an earlier run already finished them.
        unreadable_files: files the DICOM index could not parse.
        elapsed_s: wall time of the scoring stage.
        outputs: the files written.
    """

    total: int
    counts: dict[str, int]
    scored_now: int
    resumed: int
    unreadable_files: int
    elapsed_s: float
    outputs: list[Path]

    @property
    def scans_per_hour(self) -> float:
        return 3600.0 * self.scored_now / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _engine(name: str) -> Engine:
    if name == "ray":
        from medssl.scoring.ray_engine import run_ray

        return run_ray
    from medssl.scoring.local import run_local

    return run_local


def score(source: str | Path, out_dir: str | Path, spec: RunnerSpec, rules: SelectionRules | None = None,
          options: ScoreOptions | None = None, progress: Progress | None = None) -> ScoreSummary:
    """Score every selected series of ``source`` into ``out_dir``.

    Resumable: series already ``ok``/``skipped`` in ``out_dir`` for the same model version
    are not run again; ``failed`` ones are retried.

    Raises:
        MedsslError: the input, the model or the options are unusable (nothing is scored).
    """
    options = options or ScoreOptions()
    card = spec.card()
    # once per run: a detector without an operating point reports from the legacy threshold
    warn_without_operating_point(card, options.dicom.min_probability if options.dicom else None)
    if card.task is Task.SEGMENTATION:
        options = replace(options, label_maps=(Path(out_dir) / "labels").resolve())
    manifest = build_manifest(source)
    items = manifest.items if options.shard is None else options.shard.select(manifest.items)
    store = ResultStore(out_dir)
    try:
        chosen, skipped = select_series(items, rules or SelectionRules())
        done = store.done(card.name, card.version)
        store.commit_many([(skipped_row(skip.item, card, skip.reason), ()) for skip in skipped
                           if skip.item.key not in done])
        todo = [item for item in chosen if item.key not in done]
        if options.limit is not None:
            todo = todo[: options.limit]
        start = time.perf_counter()
        finished = 0
        for result in _engine(options.engine)(todo, spec, card, options):
            store.commit(result.row, result.findings)
            finished += 1
            if progress:
                progress(finished, len(todo), store.counts())
        elapsed = time.perf_counter() - start
        outputs = store.export(luna16_submission=manifest.layout is Layout.LUNA16)
        if manifest.unreadable:
            outputs.append(write_unreadable(Path(out_dir) / "unreadable.csv", manifest.unreadable))
        return ScoreSummary(total=len(items), counts=store.counts(), scored_now=finished,
                            resumed=len([i for i in chosen if i.key in done]),
                            unreadable_files=len(manifest.unreadable), elapsed_s=elapsed, outputs=outputs)
    finally:
        store.close()
