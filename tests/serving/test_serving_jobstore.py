"""The job store's state machine (serving/jobstore.py docstring), its durability and its queries."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medssl.serving.jobstore import JobState, JobStore, Output
from medssl.serving.spool import Spool
from tests.paths import ROOT

STUDY = "1.2.826.0.1.3680043.8.498.1"
OTHER = "1.2.826.0.1.3680043.8.498.2"
T0 = 1_700_000_000.0
REPO = ROOT


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "spool" / "jobs.sqlite")
    yield s
    s.close()


def outputs(n: int = 2) -> list[Output]:
    return [
        Output(Path(f"/spool/out/{i}.dcm"), "sr" if i == 0 else "seg", "nodules", f"2.25.{i}")
        for i in range(n)
    ]


def running(store: JobStore, study: str = STUDY, now: float = T0) -> int:
    """A job of ``study`` taken through received -> queued -> running; its id."""
    store.record_instance(study, now)
    store.assemble(0, now)
    job = store.claim(now)
    assert job is not None and job.study_uid == study
    return job.id


def sending(store: JobStore, destinations=("pacs", "viewer")) -> int:
    job_id = running(store)
    store.finish_inference(job_id, outputs(), list(destinations), now=T0 + 5)
    return job_id


# --- receiving ---------------------------------------------------------------------------------


def test_record_instance_opens_a_received_job_then_extends_it(store):
    first = store.record_instance(STUDY, T0)
    assert (first.state, first.n_instances, first.created_at, first.last_instance_at) == (
        JobState.RECEIVED,
        1,
        T0,
        T0,
    )
    again = store.record_instance(STUDY, T0 + 3)
    assert (again.id, again.n_instances, again.created_at, again.last_instance_at) == (
        first.id,
        2,
        T0,
        T0 + 3,
    )
    assert store.record_instance(OTHER, T0 + 3).id != first.id
    assert len(store.jobs()) == 2


def test_assemble_queues_only_studies_idle_long_enough(store):
    store.record_instance(STUDY, T0)
    store.record_instance(OTHER, T0 + 8)
    assert store.assemble(10, now=T0 + 9.9) == []
    queued = store.assemble(10, now=T0 + 10)
    assert [(j.study_uid, j.state, j.queued_at) for j in queued] == [
        (STUDY, JobState.QUEUED, T0 + 10)
    ]
    assert store.jobs(OTHER)[0].state is JobState.RECEIVED
    assert [j.study_uid for j in store.assemble(10, now=T0 + 18)] == [OTHER]
    assert store.assemble(10, now=T0 + 100) == []


def test_a_late_instance_reopens_a_queued_job_and_restarts_its_timer(store):
    job = store.record_instance(STUDY, T0)
    store.assemble(5, now=T0 + 5)
    late = store.record_instance(STUDY, T0 + 7)
    assert (late.id, late.state, late.queued_at, late.n_instances) == (
        job.id,
        JobState.RECEIVED,
        None,
        2,
    )
    assert store.claim(now=T0 + 100) is None  # not queued any more
    assert store.assemble(5, now=T0 + 11) == []
    assert [j.id for j in store.assemble(5, now=T0 + 12)] == [job.id]


@pytest.mark.parametrize("past", ["running", "sending", "done", "failed"])
def test_a_late_instance_of_a_study_in_progress_opens_a_new_job_superseding_it(store, past):
    job_id = running(store)
    if past == "failed":
        store.fail(job_id, "no series could be processed", now=T0 + 5)
    elif past != "running":
        store.finish_inference(job_id, outputs(), ["pacs"] if past == "sending" else [], now=T0 + 5)
    late = store.record_instance(STUDY, T0 + 6)
    assert late.id != job_id and late.state is JobState.RECEIVED and late.n_instances == 1
    assert late.supersedes == job_id
    assert store.job(job_id).state.value == past
    assert [j.id for j in store.jobs(STUDY)] == [job_id, late.id]
    assert store.record_instance(STUDY, T0 + 7).supersedes == job_id  # the same open job


def test_instances_after_a_study_was_done_make_a_new_job_process_the_whole_study(tmp_path, store):
    """40 of 48 instances are processed; the last 8 arrive after: the new job supersedes the
    first and, after a fresh idle time, its processing reads all 48 (what the gateway does)."""
    spool = Spool(tmp_path / "spool")
    series = f"{STUDY}.1"

    def receive(numbers: range, at: float) -> None:
        for i in numbers:
            spool.store(b"DICM", STUDY, series, f"{series}.{i}")
            store.record_instance(STUDY, at)

    def process(at: float) -> int:
        store.assemble(10, now=at)
        job = store.claim(now=at)
        assert job is not None, store.jobs()
        store.finish_inference(
            job.id, outputs(), ["pacs"], now=at + 1, instances=len(spool.study_files(job.study_uid))
        )
        return job.id

    receive(range(1, 41), T0)
    first = process(T0 + 10)
    receive(range(41, 49), T0 + 20)
    assert store.assemble(10, now=T0 + 29.9) == []
    second = process(T0 + 30)
    jobs = {j.id: j for j in store.jobs(STUDY)}
    assert (jobs[first].supersedes, jobs[first].n_instances, jobs[first].n_processed) == (
        None,
        40,
        40,
    )
    assert (jobs[second].supersedes, jobs[second].n_instances, jobs[second].n_processed) == (
        first,
        8,
        48,
    )


def test_a_late_instance_after_the_study_was_purged_supersedes_nothing(store):
    job_id = running(store)
    store.finish_inference(job_id, [], [], now=T0 + 1)
    store.mark_purged(job_id)
    assert store.record_instance(STUDY, T0 + 2).supersedes is None


# --- processing ------------------------------------------------------------------------------


def test_claim_takes_the_oldest_due_job_and_counts_the_attempt(store):
    assert store.claim(T0) is None
    first = store.record_instance(STUDY, T0)
    second = store.record_instance(OTHER, T0 + 1)
    store.assemble(0, now=T0 + 2)
    job = store.claim(now=T0 + 3)
    assert (job.id, job.state, job.attempts, job.started_at) == (
        first.id,
        JobState.RUNNING,
        1,
        T0 + 3,
    )
    assert store.claim(now=T0 + 3).id == second.id
    assert store.claim(now=T0 + 3) is None


def test_claim_waits_for_next_attempt_at_after_a_retry(store):
    job_id = running(store)
    retried = store.retry_or_dead(
        job_id, "Triton unavailable", max_attempts=3, backoff_s=10, now=T0 + 1
    )
    assert (retried.state, retried.error, retried.next_attempt_at) == (
        JobState.QUEUED,
        "Triton unavailable",
        T0 + 11,
    )
    assert store.claim(now=T0 + 10.9) is None
    again = store.claim(now=T0 + 11)
    assert (again.id, again.attempts, again.error) == (job_id, 2, None)


def test_retry_or_dead_dead_letters_once_attempts_are_used(store):
    job_id = running(store)
    for attempt in (1, 2):
        job = store.retry_or_dead(
            job_id, f"timeout {attempt}", max_attempts=3, backoff_s=0, now=T0 + attempt
        )
        assert job.state is JobState.QUEUED
        assert store.claim(now=T0 + attempt).attempts == attempt + 1
    dead = store.retry_or_dead(job_id, "timeout 3", max_attempts=3, backoff_s=0, now=T0 + 9)
    assert (dead.state, dead.error, dead.attempts, dead.finished_at) == (
        JobState.DEAD_LETTER,
        "timeout 3",
        3,
        T0 + 9,
    )


def test_a_failed_attempt_with_a_newer_open_job_is_superseded_by_it(store):
    """A late instance opened job B while job A ran; A's retry would re-open a second job of the
    study, so B (which re-processes every instance) takes over and A is closed."""
    a = running(store)
    b = store.record_instance(STUDY, T0 + 2)
    closed = store.retry_or_dead(a, "Triton unavailable", max_attempts=3, backoff_s=5, now=T0 + 3)
    assert closed.state is JobState.DONE and closed.finished_at == T0 + 3
    assert f"superseded by job {b.id}" in closed.error and "Triton unavailable" in closed.error
    assert store.job(b.id).state is JobState.RECEIVED
    assert [j.id for j in store.assemble(0, now=T0 + 4)] == [b.id]
    assert store.claim(now=T0 + 100).id == b.id


def test_fail_keeps_the_reason(store):
    job_id = running(store)
    failed = store.fail(
        job_id, "no series could be processed: 1.2.3 (nodules): missing slice", now=T0 + 4
    )
    assert (failed.state, failed.finished_at) == (JobState.FAILED, T0 + 4)
    assert failed.error.startswith("no series could be processed")


def test_transitions_from_the_wrong_state_are_refused(store):
    job = store.record_instance(STUDY, T0)
    for call in (
        lambda: store.fail(job.id, "x"),
        lambda: store.retry_or_dead(job.id, "x", 3, 1),
        lambda: store.finish_inference(job.id, outputs(), ["pacs"]),
    ):
        with pytest.raises(ValueError, match=f"job {job.id} is received, not running"):
            call()
    with pytest.raises(KeyError, match="no job 999"):
        store.job(999)


def test_finish_inference_with_destinations_goes_sending_with_one_delivery_each(store):
    job_id = running(store)
    job = store.finish_inference(job_id, outputs(), ["pacs", "viewer"], now=T0 + 5)
    assert (job.state, job.inferred_at, job.finished_at) == (JobState.SENDING, T0 + 5, None)
    assert store.outputs(job_id) == outputs()
    deliveries = store.deliveries(job_id)
    assert [(d.destination, d.state, d.attempts) for d in deliveries] == [
        ("pacs", "pending", 0),
        ("viewer", "pending", 0),
    ]


@pytest.mark.parametrize(("outs", "destinations"), [(2, []), (0, ["pacs"])])
def test_finish_inference_with_nothing_to_send_is_done_with_the_note(store, outs, destinations):
    job_id = running(store)
    job = store.finish_inference(
        job_id, outputs(outs), destinations, note="no series selected by the routes", now=T0 + 5
    )
    assert (job.state, job.finished_at, job.error) == (
        JobState.DONE,
        T0 + 5,
        "no series selected by the routes",
    )
    assert store.deliveries(job_id) == []


# --- sending ---------------------------------------------------------------------------------


def test_a_job_is_done_when_every_delivery_is_sent(store):
    job_id = sending(store)
    pacs, viewer = store.deliveries(job_id)
    assert {d.id for d in store.due_deliveries(now=T0 + 5)} == {pacs.id, viewer.id}
    assert store.delivery_sent(pacs.id, now=T0 + 6).state is JobState.SENDING
    done = store.delivery_sent(viewer.id, now=T0 + 7)
    assert (done.state, done.finished_at) == (JobState.DONE, T0 + 7)
    assert [(d.state, d.attempts) for d in store.deliveries(job_id)] == [("sent", 1), ("sent", 1)]
    assert store.due_deliveries(now=T0 + 100) == []


def test_a_failed_delivery_backs_off_then_dead_letters_with_its_reason(store):
    job_id = sending(store, destinations=["pacs"])
    (pacs,) = store.deliveries(job_id)
    first = store.delivery_failed(
        pacs.id, "connection refused", max_attempts=3, backoff_s=5, now=T0 + 10
    )
    assert (first.state, first.attempts, first.next_attempt_at) == ("pending", 1, T0 + 15)
    assert store.due_deliveries(now=T0 + 14.9) == []
    assert [d.id for d in store.due_deliveries(now=T0 + 15)] == [pacs.id]
    store.delivery_failed(pacs.id, "connection refused", max_attempts=3, backoff_s=10, now=T0 + 15)
    assert store.job(job_id).state is JobState.SENDING
    last = store.delivery_failed(
        pacs.id, "status 0xA700 for sr.dcm", max_attempts=3, backoff_s=20, now=T0 + 25
    )
    assert (last.state, last.attempts, last.error) == ("dead-letter", 3, "status 0xA700 for sr.dcm")
    job = store.job(job_id)
    assert (job.state, job.error, job.finished_at) == (
        JobState.DEAD_LETTER,
        "pacs: status 0xA700 for sr.dcm",
        T0 + 25,
    )
    assert store.due_deliveries(now=T0 + 1000) == []


def test_one_dead_delivery_dead_letters_the_job_once_the_others_settle(store):
    job_id = sending(store)
    pacs, viewer = store.deliveries(job_id)
    store.delivery_failed(
        viewer.id, "association rejected", max_attempts=1, backoff_s=0, now=T0 + 6
    )
    assert store.job(job_id).state is JobState.SENDING  # pacs still pending
    job = store.delivery_sent(pacs.id, now=T0 + 7)
    assert (job.state, job.error) == (JobState.DEAD_LETTER, "viewer: association rejected")


# --- restart ---------------------------------------------------------------------------------


def test_recover_resumes_running_jobs_after_a_fresh_idle_time_and_dead_letters_exhausted_ones(
    store,
):
    fresh = running(store, STUDY)
    tired = running(store, OTHER)
    store.retry_or_dead(tired, "x", max_attempts=2, backoff_s=0, now=T0)
    assert store.claim(now=T0).attempts == 2
    touched = {j.id: j for j in store.recover(max_attempts=2, now=T0 + 50)}
    assert set(touched) == {fresh, tired}
    assert (touched[fresh].state, touched[fresh].idle_since, touched[fresh].finished_at) == (
        JobState.RECEIVED,
        T0 + 50,
        None,
    )
    assert touched[fresh].last_instance_at == T0 and touched[fresh].attempts == 1
    assert "stopped while the job was running" in touched[fresh].error
    assert (touched[tired].state, touched[tired].finished_at) == (JobState.DEAD_LETTER, T0 + 50)
    assert store.assemble(10, now=T0 + 59.9) == []
    assert [j.id for j in store.assemble(10, now=T0 + 60)] == [fresh]
    assert store.claim(now=T0 + 60).attempts == 2
    assert store.recover(max_attempts=2, now=T0 + 70)[0].state is JobState.DEAD_LETTER


@pytest.mark.parametrize("state", ["received", "queued"])
def test_a_study_recovered_at_restart_waits_a_fresh_idle_time(store, state):
    """Its last instance came long before the restart, but more may still be on their way
    (the sender re-sends what the crash left unacknowledged): the timer restarts at recovery."""
    job = store.record_instance(STUDY, T0)
    if state == "queued":
        assert store.assemble(10, now=T0 + 10)
    (recovered,) = store.recover(max_attempts=3, now=T0 + 100)
    assert (
        recovered.id,
        recovered.state,
        recovered.idle_since,
        recovered.last_instance_at,
        recovered.queued_at,
        recovered.attempts,
    ) == (job.id, JobState.RECEIVED, T0 + 100, T0, None, 0)
    assert store.assemble(10, now=T0 + 109.9) == []
    late = store.record_instance(STUDY, T0 + 105)  # the re-sent rest joins the same job
    assert (late.id, late.n_instances, late.supersedes) == (job.id, 2, None)
    assert store.assemble(10, now=T0 + 114.9) == []
    assert [j.id for j in store.assemble(10, now=T0 + 115)] == [job.id]


def test_recover_keeps_a_pending_retry_backoff(store):
    job_id = running(store)
    store.retry_or_dead(job_id, "Triton unavailable", max_attempts=3, backoff_s=100, now=T0 + 1)
    (recovered,) = store.recover(max_attempts=3, now=T0 + 2)
    assert (recovered.state, recovered.next_attempt_at, recovered.error) == (
        JobState.RECEIVED,
        T0 + 101,
        "Triton unavailable",
    )
    store.assemble(0, now=T0 + 50)
    assert store.claim(now=T0 + 100) is None
    assert store.claim(now=T0 + 101).id == job_id


def test_recover_with_a_newer_open_job_of_the_study_leaves_it_to_that_job(store):
    died = running(store)
    late = store.record_instance(STUDY, T0 + 1)
    touched = store.recover(max_attempts=3, now=T0 + 50)
    assert [(j.id, j.state) for j in touched] == [
        (died, JobState.DONE),
        (late.id, JobState.RECEIVED),
    ]
    assert f"superseded by job {late.id}" in touched[0].error
    assert (touched[1].supersedes, touched[1].idle_since) == (died, T0 + 50)


def test_recover_with_two_running_jobs_of_a_study_keeps_the_newer(store):
    older = running(store)
    newer = store.record_instance(STUDY, T0 + 1)
    store.assemble(0, now=T0 + 2)
    assert store.claim(now=T0 + 2).id == newer.id
    touched = {j.id: j for j in store.recover(max_attempts=3, now=T0 + 50)}
    assert (
        touched[older].state is JobState.DONE
        and f"superseded by job {newer.id}" in touched[older].error
    )
    assert touched[newer.id].state is JobState.RECEIVED


def test_a_database_of_the_earlier_schema_gains_the_new_columns(tmp_path):
    path = tmp_path / "jobs.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, study_uid TEXT NOT NULL,
                state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                n_instances INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
                last_instance_at REAL NOT NULL, queued_at REAL, started_at REAL, inferred_at REAL,
                finished_at REAL, next_attempt_at REAL NOT NULL DEFAULT 0, error TEXT,
                purged INTEGER NOT NULL DEFAULT 0);""")
        db.execute(
            "INSERT INTO jobs (study_uid, state, n_instances, created_at, last_instance_at) "
            "VALUES (?, 'received', 3, ?, ?)",
            (STUDY, T0, T0 + 4),
        )
    store = JobStore(path)
    try:
        (job,) = store.jobs()
        assert (job.idle_since, job.supersedes, job.n_processed, job.n_instances) == (
            T0 + 4,
            None,
            None,
            3,
        )
        assert [j.id for j in store.assemble(10, now=T0 + 14)] == [job.id]
    finally:
        store.close()


def test_reconcile_opens_jobs_only_for_unknown_studies(store):
    finished = running(store, OTHER)
    store.fail(finished, "bad", now=T0 + 1)
    store.record_instance(STUDY, T0)
    lost = "1.2.826.0.1.3680043.8.498.3"
    opened = store.reconcile([STUDY, OTHER, lost], now=T0 + 2)
    assert [(j.study_uid, j.state, j.n_instances, j.last_instance_at) for j in opened] == [
        (lost, JobState.RECEIVED, 0, T0 + 2)
    ]
    assert store.reconcile([STUDY, OTHER, lost], now=T0 + 3) == []
    assert len(store.jobs()) == 3


# --- reading ---------------------------------------------------------------------------------


def test_counts_has_every_state(store):
    assert store.counts() == dict.fromkeys(JobState, 0)
    running(store, STUDY)
    store.record_instance(OTHER, T0)
    counts = store.counts()
    assert counts[JobState.RUNNING] == 1 and counts[JobState.RECEIVED] == 1
    assert sum(counts.values()) == 2 and set(counts) == set(JobState)


def test_expired_lists_finished_jobs_of_studies_with_nothing_unfinished(store):
    old = running(store, STUDY)
    store.fail(old, "bad", now=T0 + 10)
    done = running(store, OTHER)
    store.finish_inference(done, [], [], now=T0 + 20)
    assert [j.id for j in store.expired(before=T0 + 15)] == [old]
    assert [j.id for j in store.expired(before=T0 + 21)] == [old, done]
    store.record_instance(STUDY, T0 + 30)  # the study came again: keep its files
    assert [j.id for j in store.expired(before=T0 + 100)] == [done]


def test_the_database_runs_in_wal_mode(store):
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.path.with_name("jobs.sqlite-wal").exists()


def test_jobs_survive_reopening(tmp_path):
    path = tmp_path / "jobs.sqlite"
    first = JobStore(path)
    job_id = sending(first)
    first.close()
    again = JobStore(path)
    assert again.job(job_id).state is JobState.SENDING
    assert again.outputs(job_id) == outputs()
    again.close()


_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from medssl.serving.jobstore import JobStore, Output
    store = JobStore(sys.argv[1])
    i = 0
    while True:
        study = f"1.2.826.0.1.3680043.8.498.{1000 + i}"
        store.record_instance(study)
        store.record_instance(study)
        store.assemble(0)
        job = store.claim()
        output = Output(Path(f"/o/{i}.dcm"), "sr", "m", f"2.25.{i}")
        store.finish_inference(job.id, [output], ["pacs"])
        store.delivery_sent(store.deliveries(job.id)[0].id)
        print(i, flush=True)
        i += 1
""")


def test_committed_work_survives_a_process_killed_with_sigkill(tmp_path):
    """A writer process is killed (SIGKILL) in the middle of its stream of transactions: the
    reopened store is intact and has every transaction the writer saw committed."""
    path = tmp_path / "jobs.sqlite"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    last = -1
    deadline = time.monotonic() + 30
    try:
        while last < 40 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            assert line, f"the writer exited with {writer.wait()}"
            last = int(line)
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL and last >= 40

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = JobStore(path)
    jobs = store.jobs()
    done = [j for j in jobs if j.state is JobState.DONE]
    assert len(done) >= last + 1  # every study the writer reported finished
    assert len(jobs) <= len(done) + 1  # at most the one it was working on is unfinished
    for job in done:
        assert job.n_instances == 2
        assert [d.state for d in store.deliveries(job.id)] == ["sent"]
        assert len(store.outputs(job.id)) == 1
    for job in jobs:
        if job.state is JobState.SENDING:
            assert [d.state for d in store.deliveries(job.id)] == ["pending"]
    store.recover(max_attempts=3)
    assert store.counts()[JobState.RUNNING] == 0
    store.close()


def test_a_database_of_the_first_release_is_migrated_in_place(tmp_path):
    """A spool written before the operator API (no accession, no last attempt, no series,
    actions or refusals tables) opens with its jobs intact and every operator lookup working."""
    import sqlite3

    path = tmp_path / "jobs.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, study_uid TEXT NOT NULL,
            state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            n_instances INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
            last_instance_at REAL NOT NULL, queued_at REAL, started_at REAL, inferred_at REAL,
            finished_at REAL,
            next_attempt_at REAL NOT NULL DEFAULT 0, error TEXT, purged INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL,
            destination TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL DEFAULT 0,
            sent_at REAL, error TEXT, UNIQUE (job_id, destination));
        INSERT INTO jobs
            (study_uid, state, attempts, created_at, last_instance_at, finished_at, error)
            VALUES ('1.2.3', 'failed', 1, 100.0, 101.0, 105.0, 'bad series');
    """)
    db.commit()
    db.close()
    store = JobStore(path)
    job = store.job(1)
    assert (job.state, job.accession_number, job.idle_since, job.error) == (
        JobState.FAILED,
        "",
        101.0,
        "bad series",
    )
    assert (
        store.page(uid="1.2.3")[1] == 1
        and store.series(1) == []
        and store.last_attempts(["pacs"]) == {}
    )
    retried = store.retry(1, "admin", "re-sent", now=200.0)
    assert retried.state is JobState.QUEUED and store.actions(1)[0].reason == "re-sent"
    store.close()
