"""The gateway: receive (SCP) → spool → assemble studies → infer (workers) → send (SCU).

One process, a few threads around one job store:

* the **SCP** (:class:`~medssl.serving.scp.StorageSCP`) makes every instance durable in the
  spool, then counts it in the job store, and only then acknowledges it;
* the **assembler** queues a study once it has been idle ``spool.study_idle_s``;
* **workers** (``processing.workers``) run the routed models on a queued study
  (:func:`~medssl.serving.process.process_study`) and record its result files;
* the **sender** delivers each job's results to every destination, one association per
  job and destination, retrying with exponential backoff (state in the job store);
* **housekeeping** refreshes the queue/spool gauges and removes the files of studies done
  more than ``spool.keep_done_h`` ago;
* the **health server** serves ``/metrics``, ``/healthz`` and ``/readyz``;
* the **operator API and console** (``api.enabled``, :mod:`medssl.serving.api`) answer the
  operators' questions and take their actions (retry, re-deliver, cancel, purge quarantine),
  on a listener of their own with credentials.

Start-up order: the job store recovers (jobs not processed to their end wait a fresh idle time, as
their studies may still be arriving; spooled studies without a job get one), then the HTTP server,
the models (in the background when a Triton server is not reachable yet: the gateway receives and
spools meanwhile, and is not ready), then the SCP. :meth:`Gateway.stop` (SIGTERM) stops accepting
associations first, lets the open ones finish, lets workers finish the study in hand (bounded by
``timeout_s``; an unfinished job stays ``running`` and is resumed at the next start), then stops.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from medssl.errors import MedsslError, RunnerError
from medssl.scoring.result import SeriesStatus
from medssl.serving.api import ApiServer
from medssl.serving.config import GatewayConfig
from medssl.serving.http import HealthServer
from medssl.serving.jobstore import Job, JobState, JobStore, Output, SeriesRecord
from medssl.serving.logs import safe_error
from medssl.serving.metrics import GatewayMetrics
from medssl.serving.operations import Operations
from medssl.serving.process import ModelSet, TransientError, process_study
from medssl.serving.scp import StorageSCP
from medssl.serving.sender import DeliveryError, send_files
from medssl.serving.spool import Spool, StoredInstance

__all__ = ["Gateway"]

log = logging.getLogger("medssl.serving.gateway")

_TICK_S = 0.2
_HOUSEKEEPING_S = 5.0
_MODEL_RETRY_S = 5.0


@dataclass(frozen=True)
class _Loop:
    name: str
    body: Callable[[], bool]  # one round; True when it did work (then it runs again at once)
    idle_s: float


class Gateway:
    """The DICOM gateway of one :class:`~medssl.serving.config.GatewayConfig`.

    Args:
        cfg: the validated configuration.
        metrics: the metrics to update (a fresh registry by default).

    Use ``start()`` then ``stop()``, or ``run()`` to block until ``stop()`` is called (the
    command line wires SIGTERM/SIGINT to it).
    """

    def __init__(self, cfg: GatewayConfig, metrics: GatewayMetrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or GatewayMetrics()
        self.spool = Spool(cfg.spool.path, min_free_bytes=int(cfg.spool.min_free_mb * 2**20))
        self.store = JobStore(cfg.spool.path / "jobs.sqlite")
        self.scp = StorageSCP(
            cfg.scp, self.spool, self._on_stored, self.metrics, on_refused=self.store.record_refusal
        )
        self.http = (
            HealthServer(cfg.http, self.metrics, self.ready, self.healthy)
            if cfg.http.enabled
            else None
        )
        self.operations = Operations(self.store, self.spool, cfg, ready=self.ready)
        self.api = ApiServer(cfg.api, self.operations) if cfg.api.enabled else None
        self.models: ModelSet | None = None
        self._worker_models: dict[int, ModelSet] = {}
        self._model_error = (
            f"models not loaded yet: waiting for the Triton server at {cfg.models.triton_url}"
            if cfg.models.triton_url
            else "models not loaded yet"
        )
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._listening = threading.Event()
        self._threads: list[threading.Thread] = []
        self._destinations = {d.name: d for d in cfg.destinations}

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Recover the job store, then start the HTTP server, the models, the loops and the SCP.

        Raises:
            MedsslError: a model that is missing or invalid in the repository (a
                configuration error: fix the config, nothing would ever process).
        """
        recovered = self.store.recover(self.cfg.processing.max_attempts)
        opened = self.store.reconcile(self.spool.recover())
        if recovered or opened:
            log.info(
                "recovered unfinished work",
                extra={
                    "waiting_jobs": [j.id for j in recovered if j.state is JobState.RECEIVED],
                    "dead_lettered_jobs": [
                        j.id for j in recovered if j.state is JobState.DEAD_LETTER
                    ],
                    "superseded_jobs": [j.id for j in recovered if j.state is JobState.DONE],
                    "reconciled_studies": [j.study_uid for j in opened],
                    "idle_s": self.cfg.spool.study_idle_s,
                },
            )
        if self.http is not None:
            self.http.start()
        if self.api is not None:
            self.api.start()
        if self.cfg.models.triton_url is None:
            self.models = self._open_models()  # embedded: a bad model fails the start at once
        else:  # Triton may come up after the gateway: receive and spool meanwhile, not ready
            thread = threading.Thread(
                target=self._load_models_until_loaded, name="models", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        loops = [
            _Loop("assembler", self._assemble_round, _TICK_S),
            _Loop("sender", self._send_round, _TICK_S),
            _Loop("housekeeping", self._housekeeping_round, _HOUSEKEEPING_S),
        ]
        loops += [
            _Loop(f"worker-{i}", functools.partial(self._work_round, i), _TICK_S)
            for i in range(self.cfg.processing.workers)
        ]
        for loop in loops:
            self._spawn(loop)
        self.scp.start()
        self._listening.set()
        log.info(
            "gateway started",
            extra={
                "ae_title": self.cfg.scp.ae_title,
                "host": self.cfg.scp.host,
                "port": self.scp.port,
                "http_port": self.http.port if self.http else None,
                "api_port": self.api.port if self.api else None,
                "spool": str(self.spool.root),
                "models": [r.model for r in self.cfg.routes],
                "triton_url": self.cfg.models.triton_url,
            },
        )

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop accepting associations, finish or persist in-flight work, stop (idempotent)."""
        if self._stopped.is_set():
            return
        log.info("gateway stopping")
        self.scp.stop(timeout_s=min(timeout_s, 30.0))
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        loops = [t for t in self._threads if t.name != "models"]  # a Triton wait holds no work
        for thread in loops:
            thread.join(max(0.0, deadline - time.monotonic()))
        busy = [t.name for t in loops if t.is_alive()]
        if busy:
            log.warning(
                "stopped with work in hand; it resumes at the next start", extra={"threads": busy}
            )
        if self.http is not None:
            self.http.stop()
        if self.api is not None:
            self.api.stop()
        if not busy:
            for models in {
                id(m): m for m in [self.models, *self._worker_models.values()] if m
            }.values():
                models.close()
        if not busy:
            self.store.close()
        self._stopped.set()
        log.info("gateway stopped")

    def run(self) -> None:
        """``start()``, then block until ``stop()`` has finished."""
        self.start()
        self._stopped.wait()

    def ready(self) -> tuple[bool, str]:
        """Ready: the spool has room above its free-space floor (``spool.min_free_mb``), the
        models are loaded, Triton (if configured) is reachable, the SCP listens."""
        if self._stopping.is_set():
            return False, "stopping"
        full = self.spool.below_floor()
        if full is not None:
            return False, full
        if self.models is None:
            return False, self._model_error
        if not self.models.ready():
            return False, f"Triton server at {self.cfg.models.triton_url} is not ready"
        if not self._listening.is_set():
            return False, "the storage SCP is not listening yet"
        return True, "ready"

    def healthy(self) -> tuple[bool, str]:
        """Healthy: every loop thread is alive (a dead loop means restart the gateway)."""
        dead = [t.name for t in self._threads if not t.is_alive() and t.name != "models"]
        if dead and not self._stopping.is_set():
            return False, f"threads died: {', '.join(dead)}"
        return True, "ok"

    def _spawn(self, loop: _Loop) -> None:
        def run() -> None:
            while not self._stopping.is_set():
                try:
                    busy = loop.body()
                except Exception:  # a loop never dies of one bad round
                    log.exception("loop round failed", extra={"loop": loop.name})
                    busy = False
                if not busy:
                    self._stopping.wait(loop.idle_s)

        thread = threading.Thread(target=run, name=loop.name, daemon=True)
        self._threads.append(thread)
        thread.start()

    # --- receiving -------------------------------------------------------------------------

    def _on_stored(self, instance: StoredInstance) -> None:
        self.store.record_instance(
            instance.study_uid, instance.received_at, accession_number=instance.accession_number
        )

    def _assemble_round(self) -> bool:
        for job in self.store.assemble(self.cfg.spool.study_idle_s):
            self.metrics.studies.labels(state="queued").inc()
            self.metrics.stage_seconds.labels(stage="assemble").observe(
                job.queued_at - job.last_instance_at
            )
            log.info(
                "study complete",
                extra={
                    "job_id": job.id,
                    "study_uid": job.study_uid,
                    "instances": job.n_instances,
                    "supersedes": job.supersedes,
                },
            )
        return False

    # --- models and inference --------------------------------------------------------------

    def _open_models(self) -> ModelSet:
        m = self.cfg.models
        models = ModelSet(
            m.repository,
            self.cfg.routes,
            triton_url=m.triton_url,
            protocol=m.protocol,
            providers=m.providers,
            batch_size=m.batch_size,
            runtime=m.runtime,
        )
        log.info(
            "models loaded",
            extra={"models": [r.model for r in self.cfg.routes], "triton_url": m.triton_url},
        )
        return models

    def _load_models_until_loaded(self) -> None:
        while self.models is None and not self._stopping.is_set():
            try:
                self.models = self._open_models()
            except RunnerError as exc:
                self._model_error = f"models not loaded: {exc}"
                log.warning("models not loaded; retrying", extra={"error": str(exc)})
                self._stopping.wait(_MODEL_RETRY_S)

    def _models_of(self, worker: int) -> ModelSet | None:
        """Worker ``worker``'s models: the shared embedded sessions (onnxruntime's ``run`` is
        thread-safe), or, with Triton, a client set of its own (its HTTP client is not)."""
        if self.models is None or self.cfg.models.triton_url is None or worker == 0:
            return self.models
        if worker not in self._worker_models:
            self._worker_models[worker] = self._open_models()
        return self._worker_models[worker]

    def _work_round(self, worker: int) -> bool:
        models = self._models_of(worker)
        if models is None:
            return False
        job = self.store.claim()
        if job is None:
            return False
        self.metrics.studies.labels(state="running").inc()
        if job.queued_at is not None and job.started_at is not None:
            self.metrics.stage_seconds.labels(stage="queue").observe(job.started_at - job.queued_at)
        self._run_job(job, models)
        return True

    def _run_job(self, job: Job, models: ModelSet) -> None:
        fields = {"job_id": job.id, "study_uid": job.study_uid, "attempt": job.attempts}
        files = self.spool.study_files(
            job.study_uid
        )  # the whole study, earlier jobs' instances too
        log.info(
            "study processing",
            extra={**fields, "instances": len(files), "supersedes": job.supersedes},
        )
        p = self.cfg.processing
        backoff = p.retry_backoff_s * 2 ** max(job.attempts - 1, 0)
        try:
            result = process_study(
                files, self.cfg.routes, models, self.spool.output_dir(job.id), limits=p.geometry
            )
        except TransientError as exc:
            self._settled(
                self.store.retry_or_dead(job.id, str(exc), p.max_attempts, backoff), fields
            )
            return
        except MedsslError as exc:
            self._settled(
                self.store.fail(job.id, f"{type(exc).__name__}: {exc}", instances=len(files)),
                fields,
            )
            return
        except Exception as exc:  # a bug or an environment fault: retry, then dead-letter
            log.exception("study processing raised", extra=fields)
            self._settled(
                self.store.retry_or_dead(
                    job.id, f"unexpected {safe_error(exc)}", p.max_attempts, backoff
                ),
                fields,
            )
            return
        ok = [s for s in result.series if s.status is SeriesStatus.OK]
        failed = [s for s in result.series if s.status is SeriesStatus.FAILED]
        series = [
            SeriesRecord(
                s.key, s.model, s.status.value, s.error, s.n_reported, s.item.series_description
            )
            for s in result.series
        ]
        if failed and not ok:
            reasons = "; ".join(f"{s.key} ({s.model}): {s.error}" for s in failed)
            self._settled(
                self.store.fail(
                    job.id,
                    f"no series could be processed: {reasons}",
                    instances=len(files),
                    series=series,
                ),
                fields,
            )
            return
        skipped = [s for s in result.series if s.status is SeriesStatus.SKIPPED]
        note = (
            None
            if ok
            else "no series selected by the routes"
            if skipped or not result.series
            else None
        )
        if ok and failed:  # the study is done; the job keeps why its other series were not
            note = "series failed: " + "; ".join(f"{s.key} ({s.model}): {s.error}" for s in failed)
        outputs = [Output(o.path, o.kind, o.model, o.sop_instance_uid) for o in result.outputs]
        done = self.store.finish_inference(
            job.id,
            outputs,
            list(self._destinations),
            note=note,
            instances=len(files),
            series=series,
        )
        if done.started_at is not None and done.inferred_at is not None:
            self.metrics.stage_seconds.labels(stage="inference").observe(
                done.inferred_at - done.started_at
            )
        log.info(
            "study processed",
            extra={
                **fields,
                "state": done.state.value,
                "outputs": len(outputs),
                "series_ok": len(ok),
                "series_failed": len(failed),
                "series_skipped": len(skipped),
                "note": note,
                **{f"{k}_s": round(v, 3) for k, v in result.timings.items()},
            },
        )
        self._settled(done, fields)

    def _settled(self, job: Job, fields: dict[str, object]) -> None:
        if job.state in (JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER):
            self.metrics.studies.labels(state=job.state.value).inc()
        if job.state is JobState.DONE and job.finished_at is not None:
            self.metrics.stage_seconds.labels(stage="total").observe(
                job.finished_at - job.last_instance_at
            )
            if job.inferred_at is not None:
                self.metrics.stage_seconds.labels(stage="send").observe(
                    job.finished_at - job.inferred_at
                )
        level = logging.INFO if job.state in (JobState.DONE, JobState.SENDING) else logging.WARNING
        log.log(
            level,
            f"study {job.state.value}",
            extra={**fields, "state": job.state.value, "error": job.error},
        )

    # --- sending ---------------------------------------------------------------------------

    def _send_round(self) -> bool:
        due = self.store.due_deliveries()
        for delivery in due:
            if self._stopping.is_set():
                break
            fields = {
                "job_id": delivery.job_id,
                "destination": delivery.destination,
                "attempt": delivery.attempts + 1,
            }
            destination = self._destinations.get(delivery.destination)
            files = [o.path for o in self.store.outputs(delivery.job_id)]
            d = self.cfg.delivery
            try:
                if destination is None:
                    raise DeliveryError(
                        f"destination {delivery.destination!r} is no longer configured"
                    )
                send_files(destination, files, self.cfg.scp.ae_title)
            except DeliveryError as exc:
                failed = self.store.delivery_failed(
                    delivery.id, str(exc), d.max_attempts, d.backoff_s(delivery.attempts + 1)
                )
                result = "dead-letter" if failed.state == "dead-letter" else "retry"
                self.metrics.deliveries.labels(
                    destination=delivery.destination, result=result
                ).inc()
                log.warning(
                    "delivery failed",
                    extra={
                        **fields,
                        "result": result,
                        "error": str(exc),
                        "next_attempt_in_s": round(failed.next_attempt_at - time.time(), 1),
                    },
                )
                job = self.store.job(delivery.job_id)
                if job.state is JobState.DEAD_LETTER:
                    self._settled(job, {"job_id": job.id, "study_uid": job.study_uid})
                continue
            self.metrics.deliveries.labels(destination=delivery.destination, result="sent").inc()
            job = self.store.delivery_sent(delivery.id)
            log.info("delivered", extra={**fields, "files": len(files)})
            self._settled(job, {"job_id": job.id, "study_uid": job.study_uid})
        return bool(due)

    # --- housekeeping ----------------------------------------------------------------------

    def _housekeeping_round(self) -> bool:
        counts = self.store.counts()
        for state in (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING, JobState.SENDING):
            self.metrics.queue_depth.labels(state=state.value).set(counts[state])
        keep_h = self.cfg.spool.keep_done_h
        if keep_h > 0:
            for job in self.store.expired(time.time() - keep_h * 3600.0):
                self.spool.remove_study(job.study_uid)
                self.spool.remove_outputs(job.id)
                self.store.mark_purged(job.id)
        self.metrics.spool_bytes.set(self.spool.usage_bytes())
        self.store.prune_refusals(self.cfg.api.refusals_kept)
        return False
