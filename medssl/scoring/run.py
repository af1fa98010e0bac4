"""``medssl-score``'s engine-independent driver: manifest → selection → engine → result store.

The engines (:mod:`medssl.scoring.local`, :mod:`medssl.scoring.ray_engine`) only turn
:class:`ScanItem` rows into :class:`~medssl.scoring.result.SeriesResult` results; this module
decides what to run,
commits every result as it arrives (so a killed run loses only what was in flight), and
writes the final tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from medssl.models.card import Task, warn_without_operating_point
from medssl.scoring.manifest import Layout, build_manifest
from medssl.scoring.options import Engine, RunnerSpec, ScoreOptions
from medssl.scoring.select import SelectionRules, select_series
from medssl.scoring.series import skipped_result
from medssl.scoring.store import ResultStore, write_unreadable

__all__ = ["Engine", "Progress", "RunnerSpec", "ScoreOptions", "ScoreSummary", "score"]


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


def score(
    source: str | Path,
    out_dir: str | Path,
    spec: RunnerSpec,
    rules: SelectionRules | None = None,
    options: ScoreOptions | None = None,
    progress: Progress | None = None,
) -> ScoreSummary:
    """Score every selected series of ``source`` into ``out_dir``.

    ``rules`` chooses the series; None: the model card's
    (:meth:`medssl.models.card.ModelCard.selection_rules`).

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
        chosen, left_out = select_series(items, rules or card.selection_rules())
        done = store.done(card.name, card.version)
        store.commit_many(
            [
                (skipped_result(skip.item, card, skip.reason).to_row(), ())
                for skip in left_out
                if skip.item.key not in done
            ]
        )
        todo = [item for item in chosen if item.key not in done]
        if options.limit is not None:
            todo = todo[: options.limit]
        start = time.perf_counter()
        finished = 0
        for result in _engine(options.engine)(todo, spec, card, options):
            store.commit(result.to_row(), result.finding_rows())
            finished += 1
            if progress:
                progress(finished, len(todo), store.counts())
        elapsed = time.perf_counter() - start
        outputs = store.export(luna16_submission=manifest.layout is Layout.LUNA16)
        if manifest.unreadable:
            outputs.append(write_unreadable(Path(out_dir) / "unreadable.csv", manifest.unreadable))
        return ScoreSummary(
            total=len(items),
            counts=store.counts(),
            scored_now=finished,
            resumed=len([i for i in chosen if i.key in done]),
            unreadable_files=len(manifest.unreadable),
            elapsed_s=elapsed,
            outputs=outputs,
        )
    finally:
        store.close()
