"""The gateway's job store: one SQLite database (WAL mode) in the spool directory.

A job is one study's processing. Its states::

    received ──(idle time passed)──► queued ──(a worker claims it)──► running
    running ──► sending (results written, one delivery per destination)   ──► done
            ──► done    (nothing to send: no series selected, or no destinations)
            ──► queued  (a retryable failure: after a backoff, attempts < max)
            ──► failed  (the study's input cannot be processed: every routed series failed)
            ──► dead-letter (attempts exhausted; or a delivery exhausted its attempts)
    received, queued ──(an operator cancels it)──► cancelled

Operator actions (:mod:`medssl.serving.operations`, the REST API, the console and
``medssl-serve jobs``) move finished jobs back: *retry* puts a ``failed`` or ``dead-letter``
job back to ``queued`` with its attempts reset (or, when its results were written and only
their delivery was dead-lettered, its dead-lettered deliveries back to pending: the job is
``sending`` again); *redeliver* sends a ``done`` job's results to a destination once more.
Each action is a row of ``actions`` (who, when, what, why, and the outcome).

The idle timer of a job starts at ``idle_since``: its last instance's arrival, or the restart
that recovered the job (see below), whichever is later.

Late instances (documented behaviour): an instance of a study whose job is ``received``
restarts its idle timer; one whose job is ``queued`` puts it back to ``received`` (re-opened,
the timer restarts); one whose job is already ``running`` or past it (``sending``, ``done``,
``failed``, ``dead-letter``) opens a new job for the study that **supersedes** the latest
earlier one (its ``supersedes`` column holds that job's id). After the idle time the new job
re-processes every instance of the study, the earlier ones included (the worker reads the
study's whole spool folder; ``n_processed`` records how many instances the job's processing
read, whereas ``n_instances`` counts those received while the job was open). Results of the
same content carry the same deterministic UIDs (a re-sent study is idempotent at the PACS);
results over more instances are different content and carry new UIDs, so the PACS stores
the complete result beside the partial one instead of keeping whichever came first. A job
whose study folder was purged (``spool.keep_done_h``) is not superseded: its instances are
gone, and a later instance of its study is processed with what is spooled then.

A study has at most one open (``received`` or ``queued``) job: when a running job would go back
to ``queued`` (a retry, or :meth:`JobStore.recover`) while a late instance has opened a newer
job of its study, it ends ``done`` instead, its error saying "superseded by job N", and the
newer job processes the study.

Durability: the instance files are fsynced before acknowledgment (:mod:`medssl.serving.spool`);
the database runs ``synchronous=NORMAL`` in WAL mode, which survives a killed process (every
committed transaction is in the WAL). A power cut may lose the last transactions, which
:meth:`JobStore.reconcile` makes good at start: a study folder without a job gets one. After a
crash, :meth:`JobStore.recover` puts every job that was not yet processed to its end
(``received``, ``queued``, or ``running``: a worker died mid-job, its attempt counted) back to
``received`` with a fresh idle timer: the sender may still be sending the study (re-sending
what the crash left unacknowledged), so the study is processed once it has been idle again,
with every instance, instead of at once with the part received before the crash.

Times are ``time.time()`` seconds (UTC epoch).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

__all__ = [
    "FINISHED",
    "Action",
    "ActionRefused",
    "Delivery",
    "Job",
    "JobState",
    "JobStore",
    "Output",
    "SeriesRecord",
]


class JobState(str, Enum):
    """A job's state (see the module docstring)."""

    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    DEAD_LETTER = "dead-letter"
    CANCELLED = "cancelled"


#: States a job ends in (nothing more happens to it unless an operator acts).
FINISHED = (JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER, JobState.CANCELLED)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    n_instances INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    idle_since REAL NOT NULL,
    queued_at REAL,
    started_at REAL,
    inferred_at REAL,
    finished_at REAL,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    error TEXT,
    purged INTEGER NOT NULL DEFAULT 0,
    supersedes INTEGER REFERENCES jobs (id),
    n_processed INTEGER,
    accession_number TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, next_attempt_at);
CREATE UNIQUE INDEX IF NOT EXISTS one_open_job_per_study ON jobs (study_uid)
    WHERE state IN ('received', 'queued');
CREATE TABLE IF NOT EXISTS outputs (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    sent_at REAL,
    error TEXT,
    last_attempt_at REAL,
    UNIQUE (job_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS series (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    series_uid TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    n_findings INTEGER,
    description TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS series_by_job ON series (job_id);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    job_id INTEGER,
    detail TEXT,
    reason TEXT,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS actions_by_job ON actions (job_id);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    calling_ae TEXT NOT NULL,
    called_ae TEXT NOT NULL,
    peer TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS refusals_by_time ON refusals (at);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (created_at);
"""

#: Columns added after the first release, with the statement that adds each to an older
#: database (``CREATE TABLE IF NOT EXISTS`` leaves an existing table as it was).
_ADDED_COLUMNS = {
    ("jobs", "idle_since"): "ALTER TABLE jobs ADD COLUMN idle_since REAL NOT NULL DEFAULT 0",
    ("jobs", "supersedes"): "ALTER TABLE jobs ADD COLUMN supersedes INTEGER REFERENCES jobs (id)",
    ("jobs", "n_processed"): "ALTER TABLE jobs ADD COLUMN n_processed INTEGER",
    (
        "jobs",
        "accession_number",
    ): "ALTER TABLE jobs ADD COLUMN accession_number TEXT NOT NULL DEFAULT ''",
    ("deliveries", "last_attempt_at"): "ALTER TABLE deliveries ADD COLUMN last_attempt_at REAL",
}


#: Indexes of the operator's lookups (by study, accession, series, result UID; the last
#: attempt per destination), created after the columns they need.
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs (study_uid)",
    "CREATE INDEX IF NOT EXISTS jobs_by_accession ON jobs (accession_number)",
    "CREATE INDEX IF NOT EXISTS series_by_uid ON series (series_uid)",
    "CREATE INDEX IF NOT EXISTS outputs_by_uid ON outputs (sop_instance_uid)",
    "CREATE INDEX IF NOT EXISTS outputs_by_job ON outputs (job_id)",
    "CREATE INDEX IF NOT EXISTS deliveries_by_destination "
    "ON deliveries (destination, last_attempt_at)",
    "CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_at)",
)


@dataclass(frozen=True)
class Job:
    """One row of ``jobs``; times in epoch seconds (None: not reached).

    Attributes:
        n_instances: instances received (stored) while this job was the study's open job.
        idle_since: when the idle timer started: the last instance, or the restart that
            recovered the job (module docstring).
        supersedes: the id of the earlier job of the study that this one re-does with every
            instance (a late instance arrived after that job ran), or None.
        n_processed: instances of the study that the job's last processing attempt read
            (the whole study, earlier instances included); None until it recorded a result.
        accession_number: the study's AccessionNumber as its first instance gave it ("" when
            it had none). The store holds no patient-identifying value (no PatientID, no name).
    """

    id: int
    study_uid: str
    state: JobState
    attempts: int
    n_instances: int
    created_at: float
    last_instance_at: float
    idle_since: float
    queued_at: float | None
    started_at: float | None
    inferred_at: float | None
    finished_at: float | None
    next_attempt_at: float
    error: str | None
    supersedes: int | None
    n_processed: int | None
    accession_number: str = ""


@dataclass(frozen=True)
class Output:
    """A result file of a job (an SR or a SEG) to be delivered."""

    path: Path
    kind: str
    model: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Delivery:
    """The results of one job to one destination; ``state`` is pending, sent or dead-letter.
    ``error`` is the last failed attempt's; ``last_attempt_at`` when the last attempt ended."""

    id: int
    job_id: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: float
    error: str | None
    sent_at: float | None = None
    last_attempt_at: float | None = None


@dataclass(frozen=True)
class SeriesRecord:
    """What one route did with one series of a job's study (the job's last processing attempt).

    Attributes:
        series_uid: SeriesInstanceUID (or scoring's ``nouid-...`` key of a series without one).
        model: the route's model.
        status: ``ok``, ``skipped`` or ``failed``.
        reason: why it was skipped or failed (no patient-identifying values); None when ok.
        n_findings: findings reported (detection) or labels found (segmentation) when ok.
        description: its SeriesDescription ("" when none).
    """

    series_uid: str
    model: str
    status: str
    reason: str | None
    n_findings: int | None
    description: str = ""


@dataclass(frozen=True)
class Action:
    """An operator action, as recorded: who (``actor``), when (``at``, epoch s), what
    (``action``, on ``job_id`` with ``detail``), why (``reason``) and its ``outcome``."""

    id: int
    at: float
    actor: str
    action: str
    job_id: int | None
    detail: str | None
    reason: str | None
    outcome: str


class ActionRefused(ValueError):
    """An operator action that the job's state does not allow; ``conflict`` is False when the
    job does not exist (an API answers 404 rather than 409)."""

    def __init__(self, message: str, conflict: bool = True) -> None:
        super().__init__(message)
        self.conflict = conflict


class JobStore:
    """Thread-safe access to the job database at ``path`` (created if missing).

    Every method is one transaction. The gateway's threads (SCP handlers, assembler,
    workers, sender) share one instance.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(
                f"{self.path}: SQLite refused WAL mode (got {mode}); put the spool "
                f"on a local filesystem"
            )
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns a database made by an earlier version lacks."""
        with self._tx() as db:
            present = {
                (table, r["name"])
                for table in ("jobs", "deliveries")
                for r in db.execute(f"PRAGMA table_info({table})")
            }
            for column, statement in _ADDED_COLUMNS.items():
                if column not in present:
                    db.execute(statement)
            if ("jobs", "idle_since") not in present:
                db.execute("UPDATE jobs SET idle_since = last_instance_at")
            for statement in _INDEXES:  # after the columns they index exist
                db.execute(statement)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- receiving -------------------------------------------------------------------------

    def record_instance(
        self, study_uid: str, received_at: float | None = None, *, accession_number: str = ""
    ) -> Job:
        """Count a stored instance of ``study_uid``: open, extend or re-open its job.

        With no open job, the new job supersedes the study's latest earlier job whose files
        are still spooled (module docstring: late instances). ``accession_number`` fills the
        job's column while it is empty.

        Returns:
            The study's open job (state ``received``, idle timer restarted at ``received_at``).
        """
        now = time.time() if received_at is None else received_at
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE study_uid = ? AND state IN ('received', 'queued')",
                (study_uid,),
            ).fetchone()
            if row is None:
                earlier = db.execute(
                    "SELECT id, purged FROM jobs WHERE study_uid = ? ORDER BY id DESC LIMIT 1",
                    (study_uid,),
                ).fetchone()
                supersedes = (
                    earlier["id"] if earlier is not None and not earlier["purged"] else None
                )
                job_id = db.execute(
                    "INSERT INTO jobs (study_uid, state, "
                    "n_instances, created_at, last_instance_at, "
                    "idle_since, supersedes, accession_number) "
                    "VALUES (?, 'received', 1, ?, ?, ?, ?, ?)",
                    (study_uid, now, now, now, supersedes, accession_number),
                ).lastrowid
            else:
                job_id = row["id"]
                db.execute(
                    "UPDATE jobs SET state = 'received', queued_at = NULL, "
                    "n_instances = n_instances + 1, last_instance_at = ?, "
                    "idle_since = MAX(idle_since, ?), "
                    "accession_number = CASE WHEN accession_number = '' "
                    "THEN ? ELSE accession_number END "
                    "WHERE id = ?",
                    (now, now, accession_number, job_id),
                )
            return self._job(db, job_id)

    def reconcile(self, study_uids: Sequence[str], now: float | None = None) -> list[Job]:
        """Open a ``received`` job for every spooled study that has no job at all (instances
        made durable just before a crash, whose rows the crash lost)."""
        now = time.time() if now is None else now
        opened = []
        with self._tx() as db:
            for uid in study_uids:
                if db.execute("SELECT 1 FROM jobs WHERE study_uid = ?", (uid,)).fetchone() is None:
                    job_id = db.execute(
                        "INSERT INTO jobs (study_uid, state, "
                        "created_at, last_instance_at, idle_since) "
                        "VALUES (?, 'received', ?, ?, ?)",
                        (uid, now, now, now),
                    ).lastrowid
                    opened.append(self._job(db, job_id))
        return opened

    def recover(self, max_attempts: int, now: float | None = None) -> list[Job]:
        """At start, after a stop or a crash: every job not yet processed to its end waits a
        fresh idle time, because its study's instances may still be arriving.

        ``received`` and ``queued`` jobs become ``received`` with ``idle_since = now``. A
        ``running`` job (its process died; its attempt counted) does too, or goes to
        dead-letter when it has used ``max_attempts``, or ends ``done`` as superseded when a
        late instance already opened a newer job of its study. ``sending`` jobs are left to
        the sender.

        Returns:
            The jobs touched, by id.
        """
        now = time.time() if now is None else now
        stopped = "the gateway stopped while the job was running"
        with self._tx() as db:
            # newest first: of two running jobs of one study, the newer stays and supersedes
            ids = [
                r["id"]
                for r in db.execute(
                    "SELECT id FROM jobs WHERE state IN ('received', 'queued', 'running') "
                    "ORDER BY id DESC"
                )
            ]
            for job_id in ids:
                if self._superseded(db, job_id, stopped, max_attempts, now):
                    continue
                db.execute(
                    "UPDATE jobs SET error = CASE WHEN state = 'running' THEN ? ELSE error END, "
                    "state = CASE WHEN state = 'running' AND attempts >= ? THEN 'dead-letter' "
                    "ELSE 'received' END, "
                    "finished_at = CASE WHEN state = 'running' "
                    "AND attempts >= ? THEN ? ELSE NULL END, "
                    "queued_at = NULL, idle_since = MAX(idle_since, ?), "
                    "next_attempt_at = MAX(next_attempt_at, ?) "
                    "WHERE id = ?",
                    (stopped, max_attempts, max_attempts, now, now, now, job_id),
                )
            return [self._job(db, job_id) for job_id in sorted(ids)]

    def assemble(self, idle_s: float, now: float | None = None) -> list[Job]:
        """Queue every ``received`` study idle for ``idle_s`` seconds or more (since
        ``idle_since``)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            ids = [
                r["id"]
                for r in db.execute(
                    "SELECT id FROM jobs WHERE state = 'received' AND idle_since <= ? ORDER BY id",
                    (now - idle_s,),
                )
            ]
            for job_id in ids:
                db.execute(
                    "UPDATE jobs SET state = 'queued', queued_at = ? WHERE id = ?", (now, job_id)
                )
            return [self._job(db, job_id) for job_id in ids]

    # --- processing ------------------------------------------------------------------------

    def claim(self, now: float | None = None) -> Job | None:
        """Take the oldest due ``queued`` job: it becomes ``running``, one more attempt."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at, id LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, "
                "error = NULL WHERE id = ?",
                (now, row["id"]),
            )
            return self._job(db, row["id"])

    def finish_inference(
        self,
        job_id: int,
        outputs: Sequence[Output],
        destinations: Sequence[str],
        note: str | None = None,
        now: float | None = None,
        instances: int | None = None,
        series: Sequence[SeriesRecord] = (),
    ) -> Job:
        """Record a running job's results: ``sending`` with one pending delivery per
        destination, or ``done`` when there is nothing to send (``note`` says why).
        ``instances``: how many instance files of the study the processing read
        (``n_processed``); ``series``: what each route did with each series."""
        now = time.time() if now is None else now
        with self._tx() as db:
            self._require(db, job_id, JobState.RUNNING)
            self._set_processed(db, job_id, instances)
            self._set_series(db, job_id, series)
            db.execute("DELETE FROM outputs WHERE job_id = ?", (job_id,))
            db.executemany(
                "INSERT INTO outputs (job_id, path, kind, model, sop_instance_uid) "
                "VALUES (?, ?, ?, ?, ?)",
                [(job_id, str(o.path), o.kind, o.model, o.sop_instance_uid) for o in outputs],
            )
            if outputs and destinations:
                db.executemany(
                    "INSERT OR IGNORE INTO deliveries (job_id, destination, state) "
                    "VALUES (?, ?, 'pending')",
                    [(job_id, d) for d in destinations],
                )
                db.execute(
                    "UPDATE jobs SET state = 'sending', inferred_at = ?, error = ? WHERE id = ?",
                    (now, note, job_id),
                )
            else:
                db.execute(
                    "UPDATE jobs SET state = 'done', inferred_at = ?, finished_at = ?, error = ? "
                    "WHERE id = ?",
                    (now, now, note, job_id),
                )
            return self._job(db, job_id)

    def retry_or_dead(
        self, job_id: int, error: str, max_attempts: int, backoff_s: float, now: float | None = None
    ) -> Job:
        """A running job's attempt failed: back to ``queued`` after ``backoff_s``, or
        ``dead-letter`` with ``error`` once it has used ``max_attempts``."""
        now = time.time() if now is None else now
        with self._tx() as db:
            job = self._require(db, job_id, JobState.RUNNING)
            if job.attempts >= max_attempts:
                db.execute(
                    "UPDATE jobs SET state = 'dead-letter', "
                    "error = ?, finished_at = ? WHERE id = ?",
                    (error, now, job_id),
                )
            elif not self._superseded(db, job_id, error, max_attempts, now):
                db.execute(
                    "UPDATE jobs SET state = 'queued', error = ?, next_attempt_at = ? WHERE id = ?",
                    (error, now + backoff_s, job_id),
                )
            return self._job(db, job_id)

    def fail(
        self,
        job_id: int,
        error: str,
        now: float | None = None,
        instances: int | None = None,
        series: Sequence[SeriesRecord] = (),
    ) -> Job:
        """A running job's study cannot be processed (bad input): ``failed`` with ``error``.
        ``instances``: how many instance files of the study the processing read; ``series``:
        what each route did with each series."""
        now = time.time() if now is None else now
        with self._tx() as db:
            self._require(db, job_id, JobState.RUNNING)
            self._set_processed(db, job_id, instances)
            self._set_series(db, job_id, series)
            db.execute(
                "UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE id = ?",
                (error, now, job_id),
            )
            return self._job(db, job_id)

    # --- sending ---------------------------------------------------------------------------

    def due_deliveries(self, now: float | None = None, limit: int = 16) -> list[Delivery]:
        """Pending deliveries whose next attempt is due, oldest first."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at, id LIMIT ?",
                (now, limit),
            ).fetchall()
        return [_delivery(r) for r in rows]

    def outputs(self, job_id: int) -> list[Output]:
        """The result files of a job, in the order they were recorded."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM outputs WHERE job_id = ? ORDER BY rowid", (job_id,)
            ).fetchall()
        return [Output(Path(r["path"]), r["kind"], r["model"], r["sop_instance_uid"]) for r in rows]

    def delivery_sent(self, delivery_id: int, now: float | None = None) -> Job:
        """A delivery succeeded; its job becomes ``done`` when none is left pending."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "UPDATE deliveries SET state = 'sent', sent_at = ?, last_attempt_at = ?, "
                "attempts = attempts + 1, error = NULL WHERE id = ?",
                (now, now, delivery_id),
            )
            job_id = db.execute(
                "SELECT job_id FROM deliveries WHERE id = ?", (delivery_id,)
            ).fetchone()[0]
            self._settle(db, job_id, now)
            return self._job(db, job_id)

    def delivery_failed(
        self,
        delivery_id: int,
        error: str,
        max_attempts: int,
        backoff_s: float,
        now: float | None = None,
    ) -> Delivery:
        """A delivery attempt failed: retried after ``backoff_s``, or dead-letter (and its job
        with it, the reason kept) once it has used ``max_attempts``."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, error = ?, next_attempt_at = ?, "
                "last_attempt_at = ?, "
                "state = CASE WHEN attempts + 1 >= ? "
                "THEN 'dead-letter' ELSE 'pending' END WHERE id = ?",
                (error, now + backoff_s, now, max_attempts, delivery_id),
            )
            row = db.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
            self._settle(db, row["job_id"], now)
            return _delivery(row)

    def _settle(self, db: sqlite3.Connection, job_id: int, now: float) -> None:
        states = {
            r[0] for r in db.execute("SELECT state FROM deliveries WHERE job_id = ?", (job_id,))
        }
        if "pending" in states:
            return
        if "dead-letter" in states:
            errors = [
                f"{r['destination']}: {r['error']}"
                for r in db.execute(
                    "SELECT destination, error FROM deliveries "
                    "WHERE job_id = ? AND state = 'dead-letter'",
                    (job_id,),
                )
            ]
            db.execute(
                "UPDATE jobs SET state = 'dead-letter', error = ?, finished_at = ? "
                "WHERE id = ? AND state = 'sending'",
                ("; ".join(errors), now, job_id),
            )
        else:
            db.execute(
                "UPDATE jobs SET state = 'done', finished_at = ? "
                "WHERE id = ? AND state = 'sending'",
                (now, job_id),
            )

    # --- operator actions ------------------------------------------------------------------

    def retry(
        self, job_id: int, actor: str, reason: str | None = None, now: float | None = None
    ) -> Job:
        """Retry a ``failed`` or ``dead-letter`` job, recorded as ``actor``'s action.

        A job whose results were written but whose delivery was dead-lettered gets those
        deliveries back to pending (attempts reset; the job is ``sending``): its results are
        not recomputed. Any other goes back to ``queued``, attempts reset, due now.

        Raises:
            ActionRefused: no such job (``conflict`` False), or it is in another state, its
                instances were purged from the spool, or a newer job of its study is open
                (that job processes the study). The refusal is recorded too.
        """
        now = time.time() if now is None else now

        def act(db: sqlite3.Connection, job: Job) -> str:
            if job.state not in (JobState.FAILED, JobState.DEAD_LETTER):
                raise ActionRefused(
                    f"job {job.id} is {job.state.value}; only failed and dead-letter jobs "
                    f"can be retried"
                )
            dead = [
                r["destination"]
                for r in db.execute(
                    "SELECT destination FROM deliveries WHERE job_id = ? "
                    "AND state = 'dead-letter' ORDER BY id",
                    (job.id,),
                )
            ]
            has_outputs = db.execute("SELECT 1 FROM outputs WHERE job_id = ?", (job.id,)).fetchone()
            if self._purged(db, job.id):
                raise ActionRefused(
                    f"job {job.id}'s files were removed from the spool (spool.keep_done_h); "
                    f"send the study again"
                )
            if dead and has_outputs and job.inferred_at is not None:
                db.execute(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                    "error = NULL WHERE job_id = ? AND state = 'dead-letter'",
                    (now, job.id),
                )
                db.execute(
                    "UPDATE jobs SET state = 'sending', "
                    "finished_at = NULL, error = NULL WHERE id = ?",
                    (job.id,),
                )
                return "deliver again to " + ", ".join(dead)
            open_job = db.execute(
                "SELECT id FROM jobs WHERE study_uid = ? AND state IN ('received', 'queued')",
                (job.study_uid,),
            ).fetchone()
            if open_job is not None:
                raise ActionRefused(
                    f"job {open_job['id']} of the same study is open and will process it"
                )
            db.execute("DELETE FROM deliveries WHERE job_id = ?", (job.id,))
            db.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, "
                "queued_at = ?, next_attempt_at = ?, "
                "started_at = NULL, inferred_at = NULL, "
                "finished_at = NULL, error = NULL WHERE id = ?",
                (now, now, job.id),
            )
            return "process again"

        return self._act(job_id, "retry", actor, reason, now, act)

    def redeliver(
        self,
        job_id: int,
        destination: str,
        actor: str,
        reason: str | None = None,
        now: float | None = None,
    ) -> Job:
        """Send a ``done`` job's results to ``destination`` again (the job is ``sending`` until
        that delivery ends). The caller checks that ``destination`` is configured.

        Raises:
            ActionRefused: no such job, it is not done, it has no results, or they were purged.
        """
        now = time.time() if now is None else now

        def act(db: sqlite3.Connection, job: Job) -> str:
            if job.state is not JobState.DONE:
                raise ActionRefused(
                    f"job {job.id} is {job.state.value}; only done jobs can be re-delivered"
                )
            if db.execute("SELECT 1 FROM outputs WHERE job_id = ?", (job.id,)).fetchone() is None:
                raise ActionRefused(f"job {job.id} wrote no results: nothing to deliver")
            if self._purged(db, job.id):
                raise ActionRefused(
                    f"job {job.id}'s results were removed from the spool (spool.keep_done_h)"
                )
            db.execute(
                "INSERT INTO deliveries (job_id, destination, state, next_attempt_at) "
                "VALUES (?, ?, 'pending', ?) ON CONFLICT (job_id, destination) DO UPDATE SET "
                "state = 'pending', attempts = 0, next_attempt_at = excluded.next_attempt_at, "
                "error = NULL, sent_at = NULL",
                (job.id, destination, now),
            )
            db.execute(
                "UPDATE jobs SET state = 'sending', finished_at = NULL WHERE id = ?", (job.id,)
            )
            return f"deliver to {destination}"

        return self._act(job_id, "redeliver", actor, reason, now, act)

    def cancel(
        self, job_id: int, actor: str, reason: str | None = None, now: float | None = None
    ) -> Job:
        """Cancel a ``received`` or ``queued`` job: it ends ``cancelled``; its study's files are
        kept until ``spool.keep_done_h`` (a later instance opens a new job as usual).

        Raises:
            ActionRefused: no such job, or it is no longer waiting (running or finished).
        """
        now = time.time() if now is None else now

        def act(db: sqlite3.Connection, job: Job) -> str:
            if job.state not in (JobState.RECEIVED, JobState.QUEUED):
                raise ActionRefused(
                    f"job {job.id} is {job.state.value}; only received and queued jobs "
                    f"can be cancelled"
                )
            db.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, error = ? WHERE id = ?",
                (now, f"cancelled by {actor}" + (f": {reason}" if reason else ""), job.id),
            )
            return "cancelled"

        return self._act(job_id, "cancel", actor, reason, now, act)

    def record_action(
        self,
        action: str,
        actor: str,
        *,
        job_id: int | None = None,
        detail: str | None = None,
        reason: str | None = None,
        outcome: str = "ok",
        now: float | None = None,
    ) -> Action:
        """Record an operator action that is not a job transition (e.g. a quarantine purge)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row_id = db.execute(
                "INSERT INTO actions (at, actor, action, job_id, detail, reason, outcome) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (now, actor, action, job_id, detail, reason, outcome),
            ).lastrowid
            return _action(db.execute("SELECT * FROM actions WHERE id = ?", (row_id,)).fetchone())

    def _act(
        self,
        job_id: int,
        action: str,
        actor: str,
        reason: str | None,
        now: float,
        act: Callable[[sqlite3.Connection, Job], str],
    ) -> Job:
        """Run ``act`` on the job in one transaction with its ``actions`` row; a refusal is
        recorded (in a transaction of its own) and raised."""
        try:
            with self._tx() as db:
                try:
                    job = self._job(db, job_id)
                except KeyError:
                    raise ActionRefused(f"no job {job_id}", conflict=False) from None
                detail = act(db, job)
                db.execute(
                    "INSERT INTO actions (at, actor, action, job_id, detail, reason, outcome) "
                    "VALUES (?, ?, ?, ?, ?, ?, 'ok')",
                    (now, actor, action, job_id, detail, reason),
                )
                return self._job(db, job_id)
        except ActionRefused as exc:
            self.record_action(
                action, actor, job_id=job_id, reason=reason, outcome=f"refused: {exc}", now=now
            )
            raise

    @staticmethod
    def _purged(db: sqlite3.Connection, job_id: int) -> bool:
        return bool(db.execute("SELECT purged FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])

    # --- refused associations --------------------------------------------------------------

    def record_refusal(
        self, calling_ae: str, called_ae: str, peer: str, reason: str, now: float | None = None
    ) -> None:
        """Record a refused association (AE titles and address as the caller sent them)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "INSERT INTO refusals (at, calling_ae, called_ae, peer, reason) "
                "VALUES (?, ?, ?, ?, ?)",
                (now, calling_ae[:64], called_ae[:64], peer[:64], reason[:200]),
            )

    def prune_refusals(self, keep: int) -> int:
        """Keep the newest ``keep`` refusals (a caller retrying all night cannot grow the
        database without bound); returns how many were removed."""
        with self._tx() as db:
            return db.execute(
                "DELETE FROM refusals WHERE id <= (SELECT id FROM refusals ORDER BY id DESC "
                "LIMIT 1 OFFSET ?)",
                (keep,),
            ).rowcount

    # --- reading ---------------------------------------------------------------------------

    def job(self, job_id: int) -> Job:
        """One job by id (KeyError if unknown)."""
        with self._lock:
            return self._job(self._db, job_id)

    def jobs(self, study_uid: str | None = None) -> list[Job]:
        """Every job, or a study's, by id."""
        with self._lock:
            if study_uid is None:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM jobs WHERE study_uid = ? ORDER BY id", (study_uid,)
                ).fetchall()
        return [_job(r) for r in rows]

    def deliveries(self, job_id: int) -> list[Delivery]:
        """A job's deliveries, by id."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM deliveries WHERE job_id = ? ORDER BY id", (job_id,)
            ).fetchall()
        return [_delivery(r) for r in rows]

    def series(self, job_id: int) -> list[SeriesRecord]:
        """What the job's last processing attempt did with each (route, series)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM series WHERE job_id = ? ORDER BY rowid", (job_id,)
            ).fetchall()
        return [
            SeriesRecord(
                r["series_uid"],
                r["model"],
                r["status"],
                r["reason"],
                r["n_findings"],
                r["description"],
            )
            for r in rows
        ]

    def actions(self, job_id: int | None = None, limit: int = 100) -> list[Action]:
        """Operator actions, newest first (a job's, or all)."""
        with self._lock:
            if job_id is None:
                rows = self._db.execute(
                    "SELECT * FROM actions ORDER BY id DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM actions WHERE job_id = ? ORDER BY id DESC LIMIT ?",
                    (job_id, limit),
                ).fetchall()
        return [_action(r) for r in rows]

    def page(
        self,
        *,
        states: Sequence[str] = (),
        since: float | None = None,
        until: float | None = None,
        uid: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Job], int]:
        """Jobs newest first, filtered: ``states``; created in ``[since, until)``; ``uid`` a
        StudyInstanceUID, a SeriesInstanceUID of a routed series, an output's SOPInstanceUID or
        an AccessionNumber. Returns ``(jobs[offset:offset+limit], total matching)``."""
        where, args = self._filters(states, since, until, uid)
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM jobs j {where}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT * FROM jobs j {where} ORDER BY id DESC LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
        return [_job(r) for r in rows], int(total)

    @staticmethod
    def _filters(
        states: Sequence[str], since: float | None, until: float | None, uid: str | None
    ) -> tuple[str, list[object]]:
        clauses: list[str] = []
        args: list[object] = []
        if states:
            clauses.append(f"j.state IN ({', '.join('?' * len(states))})")
            args += [JobState(s).value for s in states]
        if since is not None:
            clauses.append("j.created_at >= ?")
            args.append(since)
        if until is not None:
            clauses.append("j.created_at < ?")
            args.append(until)
        if uid:
            clauses.append(
                "j.id IN (SELECT id FROM jobs WHERE study_uid = ? UNION SELECT id FROM jobs WHERE "
                "accession_number = ? UNION SELECT job_id FROM series WHERE series_uid = ? UNION "
                "SELECT job_id FROM outputs WHERE sop_instance_uid = ?)"
            )
            args += [uid] * 4
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", args

    def delivery_page(
        self, *, states: Sequence[str] = (), limit: int = 50, offset: int = 0
    ) -> tuple[list[Delivery], int]:
        """Deliveries newest first (by their last attempt, then id), optionally by state."""
        where = f"WHERE state IN ({', '.join('?' * len(states))})" if states else ""
        with self._lock:
            total = self._db.execute(
                f"SELECT COUNT(*) FROM deliveries {where}", list(states)
            ).fetchone()[0]
            rows = self._db.execute(
                f"SELECT * FROM deliveries {where} ORDER BY COALESCE(last_attempt_at, 0) "
                f"DESC, id DESC LIMIT ? OFFSET ?",
                [*states, limit, offset],
            ).fetchall()
        return [_delivery(r) for r in rows], int(total)

    def last_attempts(self, destinations: Sequence[str]) -> dict[str, Delivery]:
        """Per destination (of those named), the delivery whose attempt ended last (its state
        and error tell whether the destination answered then); none before any attempt."""
        out = {}
        with self._lock:
            for name in destinations:
                row = self._db.execute(
                    "SELECT * FROM deliveries WHERE destination = ? AND last_attempt_at IS NOT "
                    "NULL ORDER BY last_attempt_at DESC, id DESC LIMIT 1",
                    (name,),
                ).fetchone()
                if row is not None:
                    out[name] = _delivery(row)
        return out

    def oldest_waiting(self) -> float | None:
        """When the oldest ``received`` or ``queued`` job received its first instance (None:
        none)."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(created_at) FROM jobs WHERE state IN ('received', 'queued')"
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        """Deliveries per ``(destination, state)``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state"
            ).fetchall()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def finished_since(self, since: float) -> list[tuple[float, str]]:
        """``(finished_at, state)`` of every job finished at or after ``since``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT finished_at, state FROM jobs WHERE finished_at >= ? ORDER BY finished_at",
                (since,),
            ).fetchall()
        return [(float(r[0]), str(r[1])) for r in rows]

    def refusals(self, limit: int = 50, offset: int = 0) -> tuple[list[dict[str, object]], int]:
        """Refused associations newest first: ``(rows, total)``; a row has ``at``,
        ``calling_ae``, ``called_ae``, ``peer`` and ``reason``."""
        with self._lock:
            total = self._db.execute("SELECT COUNT(*) FROM refusals").fetchone()[0]
            rows = self._db.execute(
                "SELECT at, calling_ae, called_ae, peer, reason FROM refusals "
                "ORDER BY id DESC LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
        return [dict(r) for r in rows], int(total)

    def counts(self) -> dict[JobState, int]:
        """Jobs per state (every state present, zeros included)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        found = {JobState(r[0]): r[1] for r in rows}
        return {state: found.get(state, 0) for state in JobState}

    def expired(self, before: float) -> list[Job]:
        """Finished jobs (done, failed, dead-letter, cancelled) finished before ``before``, not yet
        purged, whose study has no unfinished job: their spooled files may be removed."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs j WHERE state IN ('done', "
                "'failed', 'dead-letter', 'cancelled') "
                "AND finished_at < ? AND NOT purged "
                "AND NOT EXISTS (SELECT 1 FROM jobs k "
                "WHERE k.study_uid = j.study_uid AND k.state IN "
                "('received', 'queued', 'running', 'sending')) ORDER BY id",
                (before,),
            ).fetchall()
        return [_job(r) for r in rows]

    def mark_purged(self, job_id: int) -> None:
        """Record that a finished job's spooled files were removed (``expired`` skips it)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET purged = 1 WHERE id = ?", (job_id,))

    def _job(self, db: sqlite3.Connection, job_id: int) -> Job:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id} in {self.path}")
        return _job(row)

    def _superseded(
        self, db: sqlite3.Connection, job_id: int, error: str, max_attempts: int, now: float
    ) -> bool:
        """A running job with attempts left that a newer open job of its study makes redundant
        ends ``done`` (a second open job would break ``one_open_job_per_study``)."""
        row = db.execute(
            "SELECT k.id FROM jobs j JOIN jobs k ON k.study_uid = j.study_uid AND k.id != j.id "
            "WHERE j.id = ? AND j.attempts < ? AND k.state IN ('received', 'queued')",
            (job_id, max_attempts),
        ).fetchone()
        if row is None:
            return False
        db.execute(
            "UPDATE jobs SET state = 'done', finished_at = ?, error = ? WHERE id = ?",
            (
                now,
                f"superseded by job {row['id']}, which re-processes the study "
                f"(this attempt: {error})",
                job_id,
            ),
        )
        return True

    @staticmethod
    def _set_series(db: sqlite3.Connection, job_id: int, series: Sequence[SeriesRecord]) -> None:
        db.execute("DELETE FROM series WHERE job_id = ?", (job_id,))
        db.executemany(
            "INSERT INTO series (job_id, series_uid, model, "
            "status, reason, n_findings, description) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (job_id, s.series_uid, s.model, s.status, s.reason, s.n_findings, s.description)
                for s in series
            ],
        )

    @staticmethod
    def _set_processed(db: sqlite3.Connection, job_id: int, instances: int | None) -> None:
        if instances is None:
            return
        if isinstance(instances, bool) or not isinstance(instances, int) or instances < 0:
            raise ValueError(f"instances must be a non-negative integer, got {instances!r}")
        db.execute("UPDATE jobs SET n_processed = ? WHERE id = ?", (instances, job_id))

    def _require(self, db: sqlite3.Connection, job_id: int, state: JobState) -> Job:
        job = self._job(db, job_id)
        if job.state is not state:
            raise ValueError(f"job {job_id} is {job.state.value}, not {state.value}")
        return job


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        study_uid=row["study_uid"],
        state=JobState(row["state"]),
        attempts=row["attempts"],
        n_instances=row["n_instances"],
        created_at=row["created_at"],
        last_instance_at=row["last_instance_at"],
        idle_since=row["idle_since"],
        queued_at=row["queued_at"],
        started_at=row["started_at"],
        inferred_at=row["inferred_at"],
        finished_at=row["finished_at"],
        next_attempt_at=row["next_attempt_at"],
        error=row["error"],
        supersedes=row["supersedes"],
        n_processed=row["n_processed"],
        accession_number=row["accession_number"],
    )


def _action(row: sqlite3.Row) -> Action:
    return Action(
        id=row["id"],
        at=row["at"],
        actor=row["actor"],
        action=row["action"],
        job_id=row["job_id"],
        detail=row["detail"],
        reason=row["reason"],
        outcome=row["outcome"],
    )


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        id=row["id"],
        job_id=row["job_id"],
        destination=row["destination"],
        state=row["state"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        error=row["error"],
        sent_at=row["sent_at"],
        last_attempt_at=row["last_attempt_at"],
    )
