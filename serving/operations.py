"""What a PACS administrator asks of the gateway, and the actions they take: one set of
functions behind the REST API (:mod:`medssl.serving.api`), the web console
(:mod:`medssl.serving.console`) and ``medssl-serve jobs``.

Reads answer a normal morning's questions: did last night's studies go through (studies by
state and time, with each stage's timestamps and durations), which failed and why (the job's
error and every routed series' outcome), what is stuck waiting for a PACS that is down
(deliveries with their attempts and last error; destinations up or down by their last
attempt), which calling AEs were refused, how far behind the queue is. Actions: retry a
failed or dead-lettered job, re-deliver a done job's results, cancel a waiting job, purge
old quarantine; each is recorded in the job store with who, when and why.

Every value returned is JSON-able: times are ISO 8601 UTC strings, durations seconds. No
patient-identifying value is returned unless the configuration says so
(``api.show_patient_id``: the PatientID, read from the spooled study on demand, as the job
store never holds it): a study is named by its StudyInstanceUID and AccessionNumber, a
series by its SeriesInstanceUID and SeriesDescription.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import pydicom

from medssl.serving.config import GatewayConfig, redact_url
from medssl.serving.jobstore import (
    FINISHED,
    Action,
    ActionRefused,
    Delivery,
    Job,
    JobState,
    JobStore,
)
from medssl.serving.spool import QuarantineEntry, Spool

__all__ = ["MAX_PAGE", "NotFound", "Operations", "iso"]

#: The most rows one page returns.
MAX_PAGE = 500
_DAY_S = 86400.0


class NotFound(KeyError):
    """No job, destination or entry of that name (an API answers 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


def iso(t: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC (``2026-12-07T10:15:02Z``); None stays None."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _span(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(max(b - a, 0.0), 3)


class Operations:
    """The operator's view of one gateway's job store and spool.

    Args:
        store: the job store (the gateway's own, or one opened on a stopped gateway's spool).
        spool: the spool.
        cfg: the gateway's configuration (destinations, what may be shown).
        ready: the gateway's readiness check, when it runs (the overview shows it).
    """

    def __init__(
        self,
        store: JobStore,
        spool: Spool,
        cfg: GatewayConfig,
        ready: Callable[[], tuple[bool, str]] | None = None,
    ) -> None:
        self.store = store
        self.spool = spool
        self.cfg = cfg
        self.ready = ready
        self._patient_ids: dict[str, str] = {}

    # --- reads -----------------------------------------------------------------------------

    def studies(
        self,
        *,
        states: Sequence[str] = (),
        since: float | None = None,
        until: float | None = None,
        uid: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> dict[str, Any]:
        """A page of jobs, newest first: ``{"total", "limit", "offset", "items"}``.

        Args:
            states: keep these job states (:class:`~medssl.serving.jobstore.JobState` values).
            since / until: received (first instance) in ``[since, until)``, epoch seconds.
            uid: a StudyInstanceUID, SeriesInstanceUID, result SOPInstanceUID or AccessionNumber.
            limit / offset: the page (``limit`` at most :data:`MAX_PAGE`).

        Raises:
            ValueError: an unknown state, or a negative or oversized page.
        """
        limit, offset = _page(limit, offset)
        for state in states:
            JobState(state)  # ValueError names the bad value
        jobs, total = self.store.page(
            states=states, since=since, until=until, uid=uid or None, limit=limit, offset=offset
        )
        return {
            "total": total,
            "limit": limit,
            "offset": offset,
            "items": [self._summary(j) for j in jobs],
        }

    def study(self, ref: int | str) -> dict[str, Any]:
        """One job in full: its summary, the routed series and their outcomes, its results with
        their UIDs, its deliveries, and the operator actions on it.

        Args:
            ref: a job id, or a StudyInstanceUID (its newest job).

        Raises:
            NotFound: no such job.
        """
        job = self._job(ref)
        return {
            **self._summary(job),
            "series": [vars(s) for s in self.store.series(job.id)],
            "outputs": [
                {
                    "kind": o.kind,
                    "model": o.model,
                    "sop_instance_uid": o.sop_instance_uid,
                    "file": o.path.name,
                }
                for o in self.store.outputs(job.id)
            ],
            "deliveries": [_delivery(d) for d in self.store.deliveries(job.id)],
            "actions": [_action(a) for a in self.store.actions(job.id)],
            "later_jobs": [j.id for j in self.store.jobs(job.study_uid) if j.id > job.id],
        }

    def deliveries(
        self, *, states: Sequence[str] = (), limit: int = 50, offset: int = 0
    ) -> dict[str, Any]:
        """A page of deliveries, the latest attempts first."""
        limit, offset = _page(limit, offset)
        for state in states:
            if state not in ("pending", "sent", "dead-letter"):
                raise ValueError(
                    f"delivery state must be pending, sent or dead-letter, got {state!r}"
                )
        rows, total = self.store.delivery_page(states=states, limit=limit, offset=offset)
        return {
            "total": total,
            "limit": limit,
            "offset": offset,
            "items": [_delivery(d) for d in rows],
        }

    def quarantine(self, *, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """A page of quarantined inputs, newest first, with the reason each was refused."""
        limit, offset = _page(limit, offset)
        entries = self.spool.quarantined()
        return {
            "total": len(entries),
            "limit": limit,
            "offset": offset,
            "items": [_quarantined(e) for e in entries[offset : offset + limit]],
        }

    def refusals(self, *, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """A page of refused associations, newest first (calling AE, called AE, peer, reason)."""
        limit, offset = _page(limit, offset)
        rows, total = self.store.refusals(limit=limit, offset=offset)
        return {
            "total": total,
            "limit": limit,
            "offset": offset,
            "items": [{**r, "at": iso(r["at"])} for r in rows],
        }  # type: ignore[arg-type]

    def counters(self) -> dict[str, Any]:
        """Jobs per state, and the queue: ``waiting`` (received + queued), ``in_progress``
        (running + sending) and the age of the oldest waiting job in seconds."""
        counts = {s.value: n for s, n in self.store.counts().items()}
        oldest = self.store.oldest_waiting()
        return {
            "jobs": counts,
            "waiting": counts["received"] + counts["queued"],
            "in_progress": counts["running"] + counts["sending"],
            "oldest_waiting_s": None if oldest is None else round(time.time() - oldest, 1),
        }

    def destinations(self) -> list[dict[str, Any]]:
        """Each configured destination, up or down by its last delivery attempt (``unknown``
        before any), with that attempt's time and error, and its pending/dead-letter counts."""
        last = self.store.last_attempts([d.name for d in self.cfg.destinations])
        counts = self.store.delivery_counts()
        out = []
        for d in self.cfg.destinations:
            attempt = last.get(d.name)
            status = (
                "unknown"
                if attempt is None
                else "up"
                if attempt.state == "sent" and attempt.sent_at == attempt.last_attempt_at
                else "down"
            )
            where = redact_url(d.url) if d.kind == "stow" else f"{d.ae_title}@{d.host}:{d.port}"
            out.append(
                {
                    "name": d.name,
                    "kind": d.kind,
                    "address": where,
                    "status": status,
                    "last_attempt_at": iso(attempt.last_attempt_at) if attempt else None,
                    "last_error": attempt.error
                    if attempt is not None and status == "down"
                    else None,
                    "pending": counts.get((d.name, "pending"), 0),
                    "dead_letter": counts.get((d.name, "dead-letter"), 0),
                }
            )
        return out

    def overview(self, now: float | None = None) -> dict[str, Any]:
        """The console's first page: the queue, studies finished per hour over the last 24 h
        (by outcome), the failures of the last 24 h, the destinations and readiness."""
        now = time.time() if now is None else now
        start = (now // 3600.0 - 23) * 3600.0  # 24 whole hours, the current one last
        hours = [
            {"hour": iso(start + 3600.0 * i), **{s.value: 0 for s in FINISHED}} for i in range(24)
        ]
        for finished_at, state in self.store.finished_since(start):
            hours[min(int((finished_at - start) // 3600.0), 23)][state] += 1
        failures, n_failures = self.store.page(
            states=("failed", "dead-letter"), since=now - _DAY_S, limit=20
        )
        ready = None
        if self.ready is not None:
            ok, reason = self.ready()
            ready = {"ready": ok, "reason": reason}
        return {
            "now": iso(now),
            "counters": self.counters(),
            "throughput_per_hour": hours,
            "failures_24h": {"total": n_failures, "items": [self._summary(j) for j in failures]},
            "destinations": self.destinations(),
            "readiness": ready,
        }

    def config(self) -> dict[str, Any]:
        """The effective configuration, secrets masked."""
        return self.cfg.to_dict(mask_secrets=True)

    def actions(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest operator actions, newest first."""
        return [_action(a) for a in self.store.actions(limit=min(max(int(limit), 1), MAX_PAGE))]

    # --- actions ---------------------------------------------------------------------------

    def retry(self, ref: int | str, actor: str, reason: str | None = None) -> dict[str, Any]:
        """Retry a failed or dead-lettered job (see :meth:`JobStore.retry`); returns it.

        Raises:
            NotFound: no such job.
            ActionRefused: its state does not allow it (the message says why).
        """
        return self._summary(
            self._checked(lambda: self.store.retry(self._job(ref).id, actor, reason))
        )

    def redeliver(
        self, ref: int | str, destination: str, actor: str, reason: str | None = None
    ) -> dict[str, Any]:
        """Send a done job's results to ``destination`` (a configured one) again.

        Raises:
            NotFound: no such job or destination.
            ActionRefused: the job is not done or has no results left.
        """
        names = [d.name for d in self.cfg.destinations]
        job = self._job(ref)
        if destination not in names:
            self.store.record_action(
                "redeliver",
                actor,
                job_id=job.id,
                detail=f"deliver to {destination}",
                reason=reason,
                outcome="refused: unknown destination",
            )
            raise NotFound(
                f"no destination {destination!r} (configured: {', '.join(names) or 'none'})"
            )
        return self._summary(
            self._checked(lambda: self.store.redeliver(job.id, destination, actor, reason))
        )

    def cancel(self, ref: int | str, actor: str, reason: str | None = None) -> dict[str, Any]:
        """Cancel a received or queued job.

        Raises:
            NotFound: no such job.
            ActionRefused: it is running or finished.
        """
        return self._summary(
            self._checked(lambda: self.store.cancel(self._job(ref).id, actor, reason))
        )

    def purge_quarantine(
        self, older_than_days: float, actor: str, reason: str | None = None
    ) -> dict[str, Any]:
        """Delete quarantined inputs older than ``older_than_days`` days (recorded).

        Raises:
            ValueError: a negative or non-finite age.
        """
        days = float(older_than_days)
        if not days >= 0 or days == float("inf"):
            raise ValueError(
                f"older_than_days must be a finite number >= 0, got {older_than_days!r}"
            )
        removed = self.spool.purge_quarantine(time.time() - days * _DAY_S)
        self.store.record_action(
            "purge-quarantine",
            actor,
            detail=f"older than {days:g} days: removed {removed}",
            reason=reason,
        )
        return {"removed": removed, "older_than_days": days}

    # --- helpers ---------------------------------------------------------------------------

    def _job(self, ref: int | str) -> Job:
        """A job by id, or a study's newest job by its StudyInstanceUID."""
        text = str(ref).strip()
        if text.isdigit():
            try:
                return self.store.job(int(text))
            except KeyError:
                raise NotFound(f"no job {text}") from None
        jobs = self.store.jobs(text)
        if not jobs:
            raise NotFound("no job for that StudyInstanceUID" if text else "no job reference given")
        return jobs[-1]

    @staticmethod
    def _checked(action: Callable[[], Job]) -> Job:
        try:
            return action()
        except ActionRefused as exc:
            if not exc.conflict:
                raise NotFound(str(exc)) from None
            raise

    def _summary(self, job: Job) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": job.id,
            "study_uid": job.study_uid,
            "accession_number": job.accession_number,
            "state": job.state.value,
            "attempts": job.attempts,
            "instances": job.n_instances,
            "instances_processed": job.n_processed,
            "supersedes": job.supersedes,
            "error": job.error,
            "received_at": iso(job.created_at),
            "last_instance_at": iso(job.last_instance_at),
            "queued_at": iso(job.queued_at),
            "started_at": iso(job.started_at),
            "inferred_at": iso(job.inferred_at),
            "finished_at": iso(job.finished_at),
            "durations_s": {
                "receive": _span(job.created_at, job.last_instance_at),
                "assemble": _span(job.last_instance_at, job.queued_at),
                "queue": _span(job.queued_at, job.started_at),
                "inference": _span(job.started_at, job.inferred_at),
                "send": _span(job.inferred_at, job.finished_at)
                if job.state is not JobState.CANCELLED
                else None,
                "total": _span(job.created_at, job.finished_at),
            },
        }
        if self.cfg.api.show_patient_id:
            out["patient_id"] = self._patient_id(job.study_uid)
        return out

    def _patient_id(self, study_uid: str) -> str:
        """The PatientID of a study's first spooled instance ("" once purged): read from the
        spool on demand, so that the job store never holds it."""
        if study_uid not in self._patient_ids:
            files = self.spool.study_files(study_uid)
            value = ""
            if files:
                try:
                    header = pydicom.dcmread(
                        files[0], stop_before_pixels=True, specific_tags=["PatientID"]
                    )
                    value = str(header.get("PatientID", "") or "")
                except Exception:  # noqa: BLE001 - an unreadable file shows no ID
                    value = ""
            if len(self._patient_ids) > 4096:
                self._patient_ids.clear()
            self._patient_ids[study_uid] = value
        return self._patient_ids[study_uid]


def _page(limit: int, offset: int) -> tuple[int, int]:
    limit, offset = int(limit), int(offset)
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        raise ValueError(
            f"limit must be in 1..{MAX_PAGE} and offset >= 0, got limit={limit}, offset={offset}"
        )
    return limit, offset


def _delivery(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "job_id": d.job_id,
        "destination": d.destination,
        "state": d.state,
        "attempts": d.attempts,
        "last_attempt_at": iso(d.last_attempt_at),
        "sent_at": iso(d.sent_at),
        "next_attempt_at": iso(d.next_attempt_at) if d.state == "pending" else None,
        "last_error": d.error,
    }


def _action(a: Action) -> dict[str, Any]:
    return {
        "id": a.id,
        "at": iso(a.at),
        "actor": a.actor,
        "action": a.action,
        "job_id": a.job_id,
        "detail": a.detail,
        "reason": a.reason,
        "outcome": a.outcome,
    }


def _quarantined(e: QuarantineEntry) -> dict[str, Any]:
    return {
        "name": e.name,
        "at": iso(e.time),
        "bytes": e.n_bytes,
        "reason": e.reason,
        "context": e.context,
    }
