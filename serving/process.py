"""One study in, result files out: the gateway's processing step.

:func:`process_study` takes the instances of one received study and the gateway's routes
(which model runs on which series) and writes the results as DICOM files:

1. the files' headers are indexed into series (:func:`medssl.index.index_files`): classic
   single-frame CT series and Enhanced CT (multi-frame) files alike, each a
   :class:`~medssl.scoring.manifest.ScanItem`;
2. for each route, its selection rules pick the series
   (:func:`~medssl.scoring.select.select_series`, the rules of ``medssl-score --select``);
   the others are ``skipped`` with the reason;
3. each picked series runs through scoring's pipeline
   (:func:`~medssl.scoring.series.prepare_series` then :func:`~medssl.scoring.series.infer`),
   the code ``medssl-score`` runs, so the gateway's result for a series
   (:class:`~medssl.scoring.result.SeriesResult`) is ``medssl-score``'s; results go to
   ``out_dir/<model>/<SeriesInstanceUID>/``: a detector's TID 1500 SR (``sr.dcm``, findings
   from ``route.min_probability`` up, or from the card's operating point when the route sets
   none) and, with ``route.companion_seg``, the SEG of its findings (``findings-seg.dcm``); a
   segmenter's SEG (``seg.dcm``).

A series that cannot be read or scored (a missing slice, corrupt pixels, a malformed header,
implausible geometry: :mod:`medssl.io.limits`, or a size this host cannot hold) is a ``failed``
result with the reason, and the other series go on; it is not retried, since a retry would
read the same files. A file whose header does not parse at all is skipped and logged by name
and exception type. A failure of the model runner (Triton unreachable, an inference error, the
runner out of memory) is not the study's fault: it raises :class:`TransientError` so the
caller retries the study later. Output UIDs derive from the
source series and the model, so a retry rewrites the same objects.

Logs go to ``medssl.serving.process`` and name studies and series by UID only, never a
patient's name or ID.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from medssl.dicom.written import WrittenObject
from medssl.errors import MedsslError, RunnerError
from medssl.index import index_files
from medssl.io.limits import DEFAULT_LIMITS, GeometryLimits
from medssl.models.card import ModelCard, warn_without_operating_point
from medssl.runners import OnnxRunner, TritonRunner, open_runner
from medssl.runners.triton_client import connect
from medssl.scoring.manifest import ScanItem
from medssl.scoring.result import SeriesResult, SeriesStatus
from medssl.scoring.select import select_series
from medssl.scoring.series import (
    DicomOutput,
    ModelParams,
    infer,
    model_params,
    prepare_series,
    skipped_result,
)
from medssl.serving.config import RouteConfig

__all__ = [
    "LoadedModel",
    "ModelSet",
    "OutputFile",
    "StudyResult",
    "TransientError",
    "process_study",
]

log = logging.getLogger("medssl.serving.process")

#: Seconds :meth:`ModelSet.ready` waits for Triton's answer.
READY_TIMEOUT_S = 5.0
#: The stages :attr:`StudyResult.timings` sums.
STAGES = ("read", "preprocess", "inference", "write")


class TransientError(MedsslError):
    """Processing a study failed for a reason a retry may cure: the model runner or Triton
    failed (or ran out of memory). The study itself is not at fault; the caller retries it."""


@dataclass(frozen=True)
class OutputFile:
    """A DICOM object written for a study: the written object and what made it from what.

    Attributes:
        written: the object (path, kind, SOP class, SOP instance and series UIDs, as written).
        model, model_version: the model that made it.
        source_series_uid: SeriesInstanceUID of the CT series it describes.
    """

    written: WrittenObject
    model: str
    model_version: int
    source_series_uid: str

    @property
    def path(self) -> Path:
        return self.written.path

    @property
    def kind(self) -> str:
        return self.written.kind

    @property
    def sop_instance_uid(self) -> str:
        return self.written.sop_instance_uid


@dataclass
class StudyResult:
    """What :func:`process_study` made of a study.

    Attributes:
        series: one :class:`~medssl.scoring.result.SeriesResult` per (route, series) pair
            (ok, skipped by the route's selection rules, or failed with the reason): the
            result ``medssl-score`` gets for the same series and model. The gateway records
            :attr:`~medssl.scoring.result.SeriesResult.n_reported` per series (a detector's
            findings at or above the route's threshold, a segmenter's labels found).
        timings: seconds per stage over the study's series: ``read`` (DICOM decoding),
            ``preprocess`` (resampling, normalisation), ``inference`` (the model and its
            decoding or resampling back), ``write`` (the result objects).
    """

    series: list[SeriesResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @property
    def outputs(self) -> list[OutputFile]:
        """The DICOM files written, to be sent, in the order they were written."""
        return [
            OutputFile(written, s.model, s.model_version, s.item.series_uid)
            for s in self.series
            for written in s.written
        ]


@dataclass(frozen=True)
class LoadedModel:
    """A routed model, open.

    Attributes:
        card: its model card.
        runner: its runner (embedded onnxruntime or Triton).
        params: the pipeline parameters of its task (scoring's :func:`model_params`).
    """

    card: ModelCard
    runner: OnnxRunner | TritonRunner
    params: ModelParams


class ModelSet:
    """The models of the gateway's routes, each loaded once and shared by all studies.

    Args:
        repository: the model repository (Triton layout + ``medssl.json`` cards).
        routes: the routes; each distinct (model, version) is loaded once.
        triton_url: ``host:port`` of a Triton server serving the repository; None runs the
            models in embedded onnxruntime.
        protocol: Triton's protocol, ``http`` or ``grpc``.
        providers: onnxruntime execution providers (embedded only); empty: the best
            available.
        batch_size: windows per inference request.
        runtime: the embedded runtime (:func:`medssl.runners.choose_runtime`).

    Raises:
        ModelRepositoryError: a route names a model or version the repository lacks (the
            model named, what exists listed).
        ModelCardError: a model's card is missing or invalid (its path named).
        RunnerError: a model cannot be opened: its ONNX file does not load or disagrees
            with its card, or Triton is unreachable or does not serve it (the model named).
        ValueError: ``batch_size`` < 1.

    Not thread-safe (a Triton runner is not): give each worker thread its own set.
    """

    def __init__(
        self,
        repository: Path,
        routes: Sequence[RouteConfig],
        *,
        triton_url: str | None = None,
        protocol: str = "http",
        providers: Sequence[str] = (),
        batch_size: int = 4,
        runtime: str = "auto",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.repository = Path(repository)
        self.triton_url = triton_url
        self.protocol = protocol
        self._models: dict[tuple[str, int | None], LoadedModel] = {}
        extra: dict[str, Any] = (
            {} if triton_url else {"providers": list(providers) or None, "runtime": runtime}
        )
        try:
            for route in routes:
                key = (route.model, route.version)
                if key in self._models:
                    continue
                try:
                    runner = open_runner(
                        self.repository,
                        route.model,
                        triton_url=triton_url,
                        protocol=protocol,
                        version=route.version,
                        **extra,
                    )
                except RunnerError as exc:
                    raise RunnerError(f"model {route.model!r}: {exc}") from exc
                self._models[key] = LoadedModel(
                    runner.card, runner, model_params(runner.card, batch_size)
                )
                warn_without_operating_point(runner.card, route.min_probability)
                log.info(
                    "loaded model %s v%d (%s)",
                    runner.card.name,
                    runner.card.version,
                    f"Triton {protocol}://{triton_url}"
                    if triton_url
                    else ", ".join(runner.providers),
                )
        except BaseException:
            self.close()
            raise

    def model(self, route: RouteConfig) -> LoadedModel:
        """The loaded model of ``route``.

        Raises:
            ValueError: the route was not among those the set was built with (named).
        """
        try:
            return self._models[(route.model, route.version)]
        except KeyError:
            loaded = sorted(_named(*key) for key in self._models)
            raise ValueError(
                f"{_named(route.model, route.version)} is not loaded (loaded: "
                f"{loaded}); build the ModelSet with this route"
            ) from None

    def ready(self) -> bool:
        """True when the models are loaded and, with a Triton URL, the server is live and
        ready and serves every model (asked now, waiting at most :data:`READY_TIMEOUT_S`)."""
        if not self._models:
            return False
        if self.triton_url is None:
            return True
        api = connect(self.triton_url, self.protocol, READY_TIMEOUT_S)
        try:
            return (
                api.live()
                and api.ready()
                and all(
                    api.model_ready(name, "" if version is None else str(version))
                    for name, version in self._models
                )
            )
        except Exception:  # noqa: BLE001 - the client libraries raise many types: not ready
            return False
        finally:
            api.close()

    def close(self) -> None:
        """Close every runner (idempotent); the set is not ready afterwards."""
        models, self._models = self._models, {}
        for loaded in models.values():
            loaded.runner.close()


def _named(model: str, version: int | None) -> str:
    return f"model {model!r} " + (f"version {version}" if version else "(newest version)")


def process_study(
    files: Sequence[Path],
    routes: Sequence[RouteConfig],
    models: ModelSet,
    out_dir: Path,
    *,
    limits: GeometryLimits = DEFAULT_LIMITS,
) -> StudyResult:
    """Run the routed models on the eligible series of one study and write their results.

    Args:
        files: the study's instances (any SOP classes; what is not a CT series its routes
            admit is skipped with the reason, files that do not parse are logged).
        routes: which model runs on which series (their selection rules); each route's
            outcomes and outputs are independent of the others'.
        models: the routes' loaded models.
        out_dir: results go to ``out_dir/<model>/<SeriesInstanceUID>/`` (created).
        limits: the plausible geometry of a series (:mod:`medssl.io.limits`): a series beyond
            them fails with the value and the limit, from its headers, before its pixels are
            read; they bound the memory one series may take.

    Returns:
        The files written, one outcome per (route, series), and the time spent per stage.
        No eligible series gives no outputs (the study is done).

    Raises:
        TransientError: a model runner failed (Triton unreachable, inference error, out of memory);
            never one series' headers, pixels or size; the outputs of series finished before stay on
            disk and are rewritten identically by the retry.
    """
    # One parse per file: the datasets read to group and route the study are the ones the
    # series are read from (their pixel data left on disk until then).
    index = index_files(files, keep_headers=True)
    for path, reason in index.unreadable:
        log.warning("skipping %s, not a readable DICOM file: %s", Path(path).name, reason)
    items = [ScanItem.from_record(record) for record in index.series]
    result = StudyResult()
    for route in routes:
        loaded = models.model(route)
        chosen, skipped = select_series(items, route.select)
        for skip in skipped:
            log.info("series %s, model %s: skipped (%s)", skip.item.key, route.model, skip.reason)
            result.series.append(skipped_result(skip.item, loaded.card, skip.reason))
        for item in chosen:
            _run_series(item, route, loaded, Path(out_dir), result, limits, index.headers)
    return result


def _run_series(
    item: ScanItem,
    route: RouteConfig,
    loaded: LoadedModel,
    out_dir: Path,
    result: StudyResult,
    limits: GeometryLimits,
    headers: dict[str, Dataset],
) -> None:
    """Score one series with one route's model; add its result and timings. ``headers``: the
    study's datasets from its index, used (and taken out) by the first route to read a file."""
    card = loaded.card
    prepared = prepare_series(item, loaded.params, limits, headers)
    output = DicomOutput(
        out_dir / card.name,
        route.min_probability,
        route.companion_seg,
        seg_type=route.seg_type,
        dense_seg=route.dense_seg,
    )
    scored = infer(prepared, loaded.runner, card, loaded.params, output)
    if scored.transient:
        raise TransientError(
            f"series {item.key}, model {card.name!r} v{card.version}: {scored.error}"
        )
    for stage in ("read", "preprocess"):
        result.timings[stage] += prepared.timings.get(stage, 0.0)
    result.series.append(scored)
    if scored.status is not SeriesStatus.OK:
        log.warning("series %s, model %s: failed (%s)", item.key, card.name, scored.error)
        return
    result.timings["inference"] += scored.timings["inference"] + scored.timings["postprocess"]
    result.timings["write"] += scored.timings["write"]
    log.info(
        "series %s, model %s v%d: %d findings, wrote %d objects",
        item.key,
        card.name,
        card.version,
        scored.n_reported,
        len(scored.written),
    )
