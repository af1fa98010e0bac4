"""The Ray engine: the local engine's stages as a Ray Data pipeline, for archives beyond a machine.

::

    manifest rows ──► prepare (CPU tasks) ──► infer (actor pool) ──► driver
    (from_items)      read + preprocess       model opened once       (score() commits)
                                              per actor

The stages are :func:`medssl.scoring.series.prepare_series` and
:func:`~medssl.scoring.series.infer`,
called exactly as :func:`medssl.scoring.local.run_local` calls them, so both engines give the
same rows and findings (only the timings differ).

Chunks: the manifest is fed to Ray ``ScoreOptions.ray_chunk`` series at a time (one dataset per
chunk, one block per series inside it), so an NLST-sized manifest (~200k series) never becomes
200k blocks planned at once: planning time and the object store's share of the manifest are
bounded by the chunk. Each chunk starts its own inference actor (the model is opened once per
chunk; about a second against a chunk's hours of scoring).

How data travels between stages (one row per series, ``batch_size=1`` everywhere):

* manifest → prepare: ``item``, the :class:`ScanItem` as a JSON string (``to_json``), so Arrow
  never has to infer types of optional header values.
* prepare → infer: ``prepared``, the whole :class:`Prepared` (item, preprocessed
  :class:`~medssl.volume.Volume` with its float32 array, 4×4 affine and meta, timings, error,
  and a DICOM series' headers, read once with its pixels)
  pickled into an Arrow ``large_binary`` cell. Pickle keeps every voxel and the affine
  bit-exact and carries the volume's ``meta`` dict as it is; ``large_binary`` has 64-bit
  offsets, so a block of large volumes (a 1 mm chest CT is ~150 MB) never overflows.
* infer → driver: ``scored``, the pickled :class:`~medssl.scoring.result.SeriesResult`.

Order: ``preserve_order`` is set on the dataset's own :class:`ray.data.DataContext` (the
caller's global context is not changed), so results arrive in manifest order, as with the
local engine. Every row becomes a result: ``prepare`` and ``infer`` turn any exception of one
series into a ``failed`` row (the same code as the local engine), so one series never stops
the pipeline (``max_errored_blocks`` is not used).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from medssl.errors import MedsslError
from medssl.io.limits import DEFAULT_LIMITS, GeometryLimits
from medssl.models.card import ModelCard
from medssl.scoring.manifest import ScanItem
from medssl.scoring.options import RunnerSpec, ScoreOptions
from medssl.scoring.result import SeriesResult
from medssl.scoring.series import (
    DicomOutput,
    ModelParams,
    Prepared,
    infer,
    model_params,
    prepare_series,
)

__all__ = ["run_ray"]

_PICKLE = pickle.HIGHEST_PROTOCOL


def _blobs(keys: list[str], column: str, blobs: list[bytes]) -> pa.Table:
    return pa.table(
        {"key": pa.array(keys, pa.string()), column: pa.array(blobs, pa.large_binary())}
    )


def _prepare_batch(
    batch: pa.Table, params: ModelParams, limits: GeometryLimits = DEFAULT_LIMITS
) -> pa.Table:
    """Ray task body: ``item`` (JSON) rows → ``key`` + pickled :class:`Prepared` rows."""
    keys, blobs = [], []
    for text in batch.column("item").to_pylist():
        item = ScanItem.from_json(json.loads(text))
        prepared = prepare_series(item, params, limits)  # errors become Prepared.error
        keys.append(item.key)
        blobs.append(pickle.dumps(prepared, protocol=_PICKLE))
    return _blobs(keys, "prepared", blobs)


class _InferActor:
    """Ray actor body: opens the model once, then scores pickled :class:`Prepared` rows.

    Args:
        spec: how to open the runner (once per actor).
        card: the model card (for the result rows).
        params: detection parameters (``card.detection_params(batch_size)``).
        dicom: where SRs / SEGs go (``ScoreOptions.dicom``), or None.
        label_maps: where segmentation label maps go (``ScoreOptions.label_maps``).
    """

    def __init__(
        self,
        spec: RunnerSpec,
        card: ModelCard,
        params: ModelParams,
        dicom: DicomOutput | None,
        label_maps: Path | None = None,
    ) -> None:
        self.card = card
        self.params = params
        self.dicom, self.label_maps = dicom, label_maps
        self.runner = spec.open()

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys, blobs = [], []
        for blob in batch.column("prepared").to_pylist():
            prepared: Prepared = pickle.loads(blob)
            scored = infer(
                prepared, self.runner, self.card, self.params, self.dicom, self.label_maps
            )  # never raises
            keys.append(prepared.item.key)
            blobs.append(pickle.dumps(scored, protocol=_PICKLE))
        return _blobs(keys, "scored", blobs)

    def __del__(self) -> None:
        runner, self.runner = getattr(self, "runner", None), None
        if runner is not None:
            with contextlib.suppress(Exception):  # best effort at actor shutdown
                runner.close()


def _start_ray(options: ScoreOptions) -> bool:
    """Start (or connect to) Ray unless it is already initialised; True when this call did."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
    }
    if options.ray_address is None:
        kwargs["num_cpus"] = max(
            2, options.workers + 1
        )  # + the inference actor  # a local Ray detects GPUs itself
    try:
        ray.init(address=options.ray_address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = (
            f"connect to Ray at {options.ray_address!r}"
            if options.ray_address
            else "start a local Ray"
        )
        raise MedsslError(
            f"cannot {where}: {exc} (start a cluster with `ray start --head`, or "
            "leave ray_address unset for a local one)"
        ) from exc
    return True


class _Quiet(logging.Filter):
    """Drops Ray Data's console lines below ERROR (execution summaries, progress-bar notices)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_QUIET = _Quiet()


def _quiet_console() -> list[logging.Handler]:
    """Filter Ray Data's console handlers (its log file keeps everything); returns them."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger

    handlers: list[logging.Handler] = [
        h
        for h in logging.getLogger("ray.data").handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    for handler in handlers:
        handler.addFilter(_QUIET)
    return handlers


def _dataset(
    items: Sequence[ScanItem],
    spec: RunnerSpec,
    card: ModelCard,
    options: ScoreOptions,
    params: ModelParams,
) -> Any:
    """The lazy Ray Data pipeline (nothing runs until it is iterated)."""
    import ray.data

    context = ray.data.DataContext.get_current().copy()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    context.verbose_stats_logs = False
    with ray.data.DataContext.current(context):  # the dataset keeps a copy of this context
        # One block per series, so series are prepared in parallel (a task maps a whole block).
        ds: ray.data.Dataset = ray.data.from_items(
            [{"item": json.dumps(item.to_json())} for item in items], override_num_blocks=len(items)
        )
        ds = ds.map_batches(
            _prepare_batch,  # type: ignore[arg-type]  # Ray's stubs ignore fn_kwargs
            fn_kwargs={"params": params, "limits": options.limits},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=1,
            compute=ray.data.TaskPoolStrategy(size=max(1, options.workers)),
        )
        return ds.map_batches(
            _InferActor,
            fn_constructor_kwargs={
                "spec": spec,
                "card": card,
                "params": params,
                "dicom": options.dicom,
                "label_maps": options.label_maps,
            },
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_gpus=options.ray_num_gpus or None,
        )


def run_ray(
    items: Sequence[ScanItem], spec: RunnerSpec, card: ModelCard, options: ScoreOptions
) -> Iterator[SeriesResult]:
    """Score ``items`` on Ray; yields one result per item, in the order of ``items``.

    Ray is used as found when it is already initialised (and left running); otherwise this
    starts a local Ray with ``max(2, options.workers)`` CPUs (``options.ray_address`` None) or
    connects to ``options.ray_address`` (``"auto"``: the running cluster), and shuts it down
    when the iterator finishes or is closed. On a cluster, every node needs ``medssl``
    installed and the series and the model repository at the driver's paths (shared storage).

    Args:
        items: the series to score.
        spec: how each inference actor opens the model (a relative repository is resolved
            here, against the driver's working directory).
        card: the model card.
        options: ``workers`` (prepare tasks in flight), ``batch_size`` (windows per model
            call), ``ray_address``, ``ray_num_gpus`` (GPUs per inference actor), ``ray_chunk``
            (series per dataset).

    Raises:
        MedsslError: Ray cannot be started or reached.
    """
    if not items:
        return
    params = model_params(card, options.batch_size)
    spec = replace(spec, repository=spec.repository.resolve())
    started = _start_ray(options)
    quiet: list[logging.Handler] = []
    try:
        quiet = _quiet_console()
        for start in range(0, len(items), options.ray_chunk):
            ds = _dataset(items[start : start + options.ray_chunk], spec, card, options, params)
            for batch in ds.iter_batches(
                batch_size=None, batch_format="pyarrow", prefetch_batches=0
            ):
                for blob in batch.column("scored").to_pylist():
                    yield pickle.loads(blob)
    finally:
        for handler in quiet:
            handler.removeFilter(_QUIET)
        if started:
            import ray

            ray.shutdown()
