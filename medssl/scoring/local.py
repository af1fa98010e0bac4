"""The local engine: read + prepare in worker processes, inference in this process.

Up to ``workers + 1`` series are prepared ahead of the model (a bounded queue), so the CPU
decodes the next series while the model runs one, and memory stays bounded whatever the
archive size: at most ``workers + 1`` preprocessed volumes exist at once (a 300×512×512 CT
at 1 mm is about 350×350×300 float32 ≈ 150 MB), plus one being read per worker.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor

from medssl.models.card import ModelCard
from medssl.scoring.manifest import ScanItem
from medssl.scoring.options import RunnerSpec, ScoreOptions
from medssl.scoring.result import SeriesResult
from medssl.scoring.series import Prepared, infer, model_params, prepare_series

__all__ = ["run_local"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """Worker initializer: on Linux, ask the kernel to kill this worker when the parent dies
    (a SIGKILLed run must not leave workers holding a 150 MB volume behind)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def run_local(
    items: Sequence[ScanItem], spec: RunnerSpec, card: ModelCard, options: ScoreOptions
) -> Iterator[SeriesResult]:
    """Score ``items`` in order; yields one result per item as soon as it is done."""
    params = model_params(card, options.batch_size)
    runner = spec.open()
    try:
        if options.workers == 0:
            for item in items:
                yield infer(
                    prepare_series(item, params, options.limits),
                    runner,
                    card,
                    params,
                    options.dicom,
                    options.label_maps,
                )
            return
        # spawn: workers must not inherit the runner's threads (onnxruntime, gRPC) by fork.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=options.workers, mp_context=context, initializer=_die_with_parent
        ) as pool:
            pending: deque[Future[Prepared]] = deque()
            queue = iter(items)
            for item in queue:
                pending.append(pool.submit(prepare_series, item, params, options.limits))
                if len(pending) > options.workers:
                    break
            while pending:
                prepared = pending.popleft().result()
                nxt = next(queue, None)
                if nxt is not None:
                    pending.append(pool.submit(prepare_series, nxt, params, options.limits))
                yield infer(prepared, runner, card, params, options.dicom, options.label_maps)
    finally:
        runner.close()
