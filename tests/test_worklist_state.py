"""The study completeness rule, the job state machine and the export attempts, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import event, select, update

from worklist import completeness
from worklist.completeness import Readiness, promote_ready_studies
from worklist.exports import (
    claim_due,
    extend_claims,
    jobs_with_due_exports,
    mark_delivered,
    mark_failed_attempt,
    retry_failed,
)
from worklist.models import Export, ExportState, Instance, Job, JobState, Result, Series, Study, StudyState, utcnow
from worklist.queries import node_status, triage_list
from worklist.state import (
    claim_job,
    complete_job,
    earlier_done_jobs,
    fail_job,
    heartbeat,
    job_state,
    jobs_to_resend,
    queue_job,
    release_jobs_of,
    stale_running_jobs,
)
from worklist.triage import as_utc
from worklist.writers import WriterQueue

READINESS = Readiness.from_seconds(settle=1, timeout=60)


def add_study(sessions, uid: str, views: list[str], age: float, analysable: bool = True) -> int:
    """A study whose last instance arrived ``age`` seconds ago, with one instance per view name."""
    when = utcnow() - timedelta(seconds=age)
    with sessions.begin() as session:
        study = Study(study_instance_uid=uid, accession_number=f"A{uid[-4:]}", last_received_at=when)
        series = Series(series_instance_uid=f"{uid}.1", study=study, modality="MG")
        for index, name in enumerate(views):
            session.add(Instance(study=study, series=series, sop_instance_uid=f"{uid}.1.{index}",
                                 sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                                 laterality=name[0], view=name[1:], analysable=analysable, path=f"{index}.dcm",
                                 size_bytes=1, content_digest="blake3:" + "0" * 64, received_at=when))
        session.add(study)
        session.flush()
        return study.id


def jobs_of(sessions, study_id: int) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.id)))


def test_four_views_are_ready_after_the_settle_time_and_only_once(sessions):
    complete = add_study(sessions, "1.2.3.1", ["LCC", "RCC", "LMLO", "RMLO"], age=5)
    settling = add_study(sessions, "1.2.3.2", ["LCC", "RCC", "LMLO", "RMLO"], age=0)
    partial = add_study(sessions, "1.2.3.3", ["LCC", "RCC", "LMLO"], age=5)
    not_mg = add_study(sessions, "1.2.3.4", ["LCC"], age=3600, analysable=False)
    created = promote_ready_studies(sessions, READINESS)
    assert [job.id for job in jobs_of(sessions, complete)] == created
    assert jobs_of(sessions, settling) == jobs_of(sessions, partial) == jobs_of(sessions, not_mg) == []
    assert promote_ready_studies(sessions, READINESS) == []  # READY now: no second job
    with sessions() as session:
        assert session.get(Study, complete).state == StudyState.READY
        assert session.get(Study, not_mg).state == StudyState.RECEIVING


def test_a_study_missing_a_view_is_ready_after_the_inactivity_timeout(sessions):
    partial = add_study(sessions, "1.2.3.5", ["LCC", "RCC", "LMLO"], age=61)
    assert len(promote_ready_studies(sessions, READINESS)) == 1
    assert jobs_of(sessions, partial)[0].state == JobState.READY


def test_a_promotion_is_written_in_the_writers_turn(sessions, tmp_path):
    """The Storage SCP's writers queue for their turn (``worklist.writers``); a promotion queues with them rather
    than take SQLite's lock from under them."""
    study = add_study(sessions, "1.2.3.7", ["LCC", "RCC", "LMLO", "RMLO"], age=5)
    writers = WriterQueue(tmp_path / "worklist.sqlite.writers")
    created: list[int] = []
    promoting = threading.Thread(target=lambda: created.extend(
        promote_ready_studies(sessions, READINESS, turn=writers.turn)))
    with writers.turn():
        promoting.start()
        promoting.join(0.5)
        assert promoting.is_alive() and jobs_of(sessions, study) == []  # waiting for the turn held here
    promoting.join(30)
    assert [job.id for job in jobs_of(sessions, study)] == created and len(created) == 1


def test_ready_studies_are_promoted_together_in_transactions_of_a_batch(sessions, monkeypatch):
    monkeypatch.setattr(completeness, "PROMOTION_BATCH", 2)
    studies = [add_study(sessions, f"1.2.3.8{index}", ["LCC", "RCC", "LMLO", "RMLO"], age=5) for index in range(3)]
    waiting = add_study(sessions, "1.2.3.89", ["LCC"], age=5)  # neither complete nor timed out
    commits: list[int] = []

    def count(connection: object) -> None:
        commits.append(1)

    engine = sessions.kw["bind"]
    event.listen(engine, "commit", count)
    try:
        created = promote_ready_studies(sessions, READINESS)
    finally:
        event.remove(engine, "commit", count)
    assert len(created) == 3 and len(commits) == 2  # two batches: 2 + 1 studies (and the waiting one)
    assert [len(jobs_of(sessions, study)) for study in studies] == [1, 1, 1] and jobs_of(sessions, waiting) == []


def test_concurrent_promotion_creates_one_job(sessions):
    study = add_study(sessions, "1.2.3.6", ["LCC", "RCC", "LMLO", "RMLO"], age=5)
    threads = [threading.Thread(target=promote_ready_studies, args=(sessions, READINESS)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(jobs_of(sessions, study)) == 1


def ready_job(sessions, uid: str) -> int:
    add_study(sessions, uid, ["LCC", "RCC", "LMLO", "RMLO"], age=5)
    return promote_ready_studies(sessions, READINESS)[0]


def test_job_runs_once_and_records_result_and_exports(sessions):
    job_id = ready_job(sessions, "1.2.3.7")
    assert queue_job(sessions, job_id, "task-1")
    stale = timedelta(seconds=60)
    claim = claim_job(sessions, job_id, "host:1", stale)
    assert claim is not None and claim.attempt == 1 and claim.study_instance_uid == "1.2.3.7"
    assert claim_job(sessions, job_id, "host:2", stale) is None  # a duplicate delivery while it runs
    exports = [("pacs", "1.2.9.1", "/r/SR.dcm"), ("pacs", "1.2.9.2", "/r/SEG_LCC.dcm")]
    assert complete_job(sessions, claim, {"suspicion": 0.7}, 0.7, {"model": 1.0}, "demo@abc", exports)
    assert not complete_job(sessions, claim, {}, 0.1, {}, "demo@abc", [])  # finishing twice writes nothing
    assert claim_job(sessions, job_id, "host:3", stale) is None  # DONE stays DONE
    with sessions() as session:
        job = session.get(Job, job_id)
        study = session.get(Study, job.study_id)
        assert (job.state, job.timings, job.model_version) == (JobState.DONE, {"model": 1.0}, "demo@abc")
        assert (study.state, study.suspicion, study.views_complete) == (StudyState.ANALYSED, 0.7, True)
        assert session.scalar(select(Result.suspicion).where(Result.job_id == job_id)) == 0.7
        assert sorted(session.scalars(select(Export.path).where(Export.job_id == job_id))) == [
            "/r/SEG_LCC.dcm", "/r/SR.dcm"]


def test_a_study_analysed_on_three_views_is_marked_incomplete(sessions):
    study = add_study(sessions, "1.2.3.17", ["LCC", "RCC", "LMLO"], age=61)
    job_id = promote_ready_studies(sessions, READINESS)[0]
    claim = claim_job(sessions, job_id, "host:1", timedelta(seconds=60))
    assert complete_job(sessions, claim, {}, 0.4, {}, "m", [])
    with sessions() as session:
        assert (session.get(Study, study).state, session.get(Study, study).views_complete) == (
            StudyState.ANALYSED, False)


def test_a_stale_running_job_is_taken_over_and_the_old_lease_cannot_finish(sessions):
    job_id = ready_job(sessions, "1.2.3.8")
    old = claim_job(sessions, job_id, "host:1", timedelta(seconds=60))
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=120)))
    assert stale_running_jobs(sessions, timedelta(seconds=60)) == [job_id]
    assert job_id in jobs_to_resend(sessions, timedelta(seconds=60))
    new = claim_job(sessions, job_id, "host:2", timedelta(seconds=60))
    assert new is not None and new.attempt == 2
    assert not complete_job(sessions, old, {}, 0.1, {}, "m", [])
    assert complete_job(sessions, new, {}, 0.2, {}, "m", [])


def test_failures_retry_then_fail_and_mark_the_study(sessions):
    job_id = ready_job(sessions, "1.2.3.9")
    claim = claim_job(sessions, job_id, "host:1", timedelta(seconds=60))
    assert fail_job(sessions, claim, "RuntimeError: out of memory", retry=True) == JobState.QUEUED
    claim = claim_job(sessions, job_id, "host:1", timedelta(seconds=60))
    assert claim.attempt == 2
    assert fail_job(sessions, claim, "ImageDecodeError: truncated", retry=False) == JobState.FAILED
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.attempts, job.error) == (JobState.FAILED, 2, "ImageDecodeError: truncated")
        assert session.get(Study, job.study_id).state == StudyState.FAILED
    assert triage_list(sessions)[-1]["error"] == "ImageDecodeError: truncated"


def test_an_analysis_that_left_a_received_view_out_is_listed_apart(sessions):
    """Four views received, one unreadable and left out of the analysis: the study is not ranked with the
    complete ones, and its row names the view as missing."""
    job_id = ready_job(sessions, "1.2.3.14")
    claim = claim_job(sessions, job_id, "host:1", timedelta(seconds=60))
    assert complete_job(sessions, claim, {"missing_views": ["LCC"]}, 0.9, {}, "m", [])
    with sessions() as session:
        study = session.get(Study, session.get(Job, job_id).study_id)
        assert (study.state, study.views_complete) == (StudyState.ANALYSED, False)
    (row,) = [row for row in triage_list(sessions) if row["study_instance_uid"] == "1.2.3.14"]
    assert (row["section"], row["missing_views"]) == ("incomplete", ["LCC"])


def test_a_failed_analysis_leaves_no_suspicion_and_no_names_in_its_error(sessions):
    """A study that fails after an earlier result keeps none of its score, and the error recorded (shown on the
    pages and logged) carries none of the study's identifiers, whatever the library quoted."""
    job_id = ready_job(sessions, "1.2.3.15")
    with sessions.begin() as session:
        session.execute(update(Study).where(Study.study_instance_uid == "1.2.3.15").values(
            suspicion=0.8, patient_name="Doe^Jane^Q", patient_id="PID-4711"))
    claim = claim_job(sessions, job_id, "host:1", timedelta(seconds=60))
    assert fail_job(sessions, claim, "ValueError: invalid value 'DOE^JANE^Q' for PID-4711 (doe jane); A3.15",
                    retry=False) == JobState.FAILED
    with sessions() as session:
        job = session.get(Job, job_id)
        assert session.get(Study, job.study_id).suspicion is None
        assert job.error == "ValueError: invalid value '[redacted]' for [redacted] ([redacted] [redacted]); [redacted]"


def test_an_export_error_is_recorded_without_the_study_identifiers(sessions):
    job_id = ready_job(sessions, "1.2.3.16")
    with sessions.begin() as session:
        session.execute(update(Study).where(Study.study_instance_uid == "1.2.3.16").values(patient_name="Roe^Richard"))
    claim = claim_job(sessions, job_id, "host:1", timedelta(seconds=60))
    complete_job(sessions, claim, {}, 0.5, {}, "m", [("pacs", "1.2.9.5", "/r/SR.dcm")])
    (attempt,) = claim_due(sessions, job_id, timedelta(seconds=300), 10)
    mark_failed_attempt(sessions, attempt, "refused: Patient's Name RICHARD ROE", max_attempts=2, first_backoff=0.01)
    with sessions() as session:
        assert session.scalars(select(Export.error)).one() == "refused: Patient's Name [redacted] [redacted]"


def test_a_late_instance_sends_the_study_back_for_a_new_analysis(sessions):
    job_id = ready_job(sessions, "1.2.3.10")
    claim = claim_job(sessions, job_id, "host:1", timedelta(seconds=60))
    with sessions.begin() as session:  # an analysable instance arrives while the job runs (dicom_node.storage)
        session.execute(update(Study).where(Study.study_instance_uid == "1.2.3.10").values(
            revision=Study.revision + 1))
    assert complete_job(sessions, claim, {}, 0.3, {}, "m", [])
    with sessions() as session:
        assert session.scalar(select(Study.state).where(Study.study_instance_uid == "1.2.3.10")) == \
            StudyState.RECEIVING


def test_release_jobs_of_a_dead_worker(sessions):
    job_id = ready_job(sessions, "1.2.3.11")
    claim_job(sessions, job_id, "host:41", timedelta(seconds=60))
    assert release_jobs_of(sessions, "host:42") == []
    assert release_jobs_of(sessions, "host:41") == [job_id]
    assert claim_job(sessions, job_id, "host:43", timedelta(seconds=60)).attempt == 2


def test_a_send_overtaken_by_a_newer_claim_does_not_decide_the_export(sessions):
    job_id = ready_job(sessions, "1.2.3.13")
    claim = claim_job(sessions, job_id, "host:1", timedelta(seconds=60))
    complete_job(sessions, claim, {}, 0.5, {}, "m", [("pacs", "1.2.9.4", "/r/SR.dcm")])
    hold = timedelta(seconds=300)
    (slow,) = claim_due(sessions, job_id, hold, 10)
    extend_claims(sessions, [slow], hold)  # the send goes on: its claim is pushed on, nobody else may take it
    assert claim_due(sessions, job_id, hold, 10) == []
    with sessions.begin() as session:  # a send so slow that its hold ran out after all
        session.execute(update(Export).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
    (newer,) = claim_due(sessions, job_id, hold, 10)
    extend_claims(sessions, [slow], timedelta(0))  # the overtaken send no longer moves the newer claim
    mark_failed_attempt(sessions, slow, "timed out", max_attempts=2, first_backoff=0.01)
    with sessions() as session:
        export = session.scalars(select(Export)).one()
        assert (export.state, export.attempts, export.error) == (ExportState.PENDING, 2, None)
        assert as_utc(export.next_attempt_at) > utcnow() + timedelta(seconds=200)
    mark_failed_attempt(sessions, newer, "refused", max_attempts=2, first_backoff=0.01)  # the newer one decides
    with sessions() as session:
        assert session.scalars(select(Export)).one().state == ExportState.FAILED


def test_export_attempts_back_off_fail_visibly_and_retry(sessions):
    job_id = ready_job(sessions, "1.2.3.12")
    claim = claim_job(sessions, job_id, "host:1", timedelta(seconds=60))
    complete_job(sessions, claim, {}, 0.5, {}, "m", [("pacs", "1.2.9.3", "/r/SR.dcm")])
    assert list(jobs_with_due_exports(sessions)) == [job_id]
    hold = timedelta(seconds=300)
    (attempt,) = claim_due(sessions, job_id, hold, 10)
    assert claim_due(sessions, job_id, hold, 10) == []  # a duplicate task finds nothing due
    assert mark_failed_attempt(sessions, attempt, "refused", max_attempts=2, first_backoff=0.01) == ExportState.PENDING
    with sessions.begin() as session:  # the backoff has passed
        session.execute(update(Export).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
    (attempt,) = claim_due(sessions, job_id, hold, 10)
    assert attempt.attempt == 2
    assert mark_failed_attempt(sessions, attempt, "refused", max_attempts=2, first_backoff=0.01) == ExportState.FAILED
    assert node_status(sessions)["exports"] == {"FAILED": 1}
    assert jobs_with_due_exports(sessions) == {}
    assert retry_failed(sessions) == 1
    (attempt,) = claim_due(sessions, job_id, hold, 10)
    mark_delivered(sessions, attempt)
    assert retry_failed(sessions) == 0  # a delivered export is never sent again
    assert triage_list(sessions)[0]["exports"] == {"DELIVERED": 1}


def test_a_new_analysis_supersedes_the_undelivered_exports_of_the_old_one(sessions):
    """An old SR still waiting for its backoff (or FAILED, open to retry-exports) must not reach the PACS after
    the new one and read as the latest."""
    first = ready_job(sessions, "1.2.3.17")
    complete_job(sessions, claim_job(sessions, first, "host:1", timedelta(seconds=60)), {}, 0.5, {}, "m", [
        ("pacs", "1.2.9.6", "/r/1/SR.dcm"), ("pacs", "1.2.9.7", "/r/1/SEG_LCC.dcm"), ("pacs", "1.2.9.8", "/r/1/x")])
    hold = timedelta(seconds=300)
    delivered, failed, waiting = claim_due(sessions, first, hold, 10)
    mark_delivered(sessions, delivered)
    mark_failed_attempt(sessions, failed, "refused", max_attempts=1, first_backoff=0.01)
    mark_failed_attempt(sessions, waiting, "PACS down", max_attempts=10, first_backoff=60)
    with sessions.begin() as session:  # a changed image arrived: the study is analysed again
        session.execute(update(Study).where(Study.study_instance_uid == "1.2.3.17").values(
            state=StudyState.RECEIVING, last_received_at=utcnow() - timedelta(seconds=5)))
    (second,) = promote_ready_studies(sessions, READINESS)
    complete_job(sessions, claim_job(sessions, second, "host:1", timedelta(seconds=60)), {}, 0.6, {}, "m", [
        ("pacs", "1.2.9.9", "/r/2/SR.dcm")])
    with sessions() as session:
        states = dict(session.execute(select(Export.sop_instance_uid, Export.state)).all())
        superseded = session.scalars(select(Export.error).where(Export.state == ExportState.SUPERSEDED)).all()
    assert states == {"1.2.9.6": ExportState.DELIVERED, "1.2.9.7": ExportState.SUPERSEDED,
                      "1.2.9.8": ExportState.SUPERSEDED, "1.2.9.9": ExportState.PENDING}
    assert superseded == [f"superseded by job {second}'s results before it was delivered"] * 2
    assert retry_failed(sessions) == 0 and list(jobs_with_due_exports(sessions)) == [second]
    assert earlier_done_jobs(sessions, second) == [first] and earlier_done_jobs(sessions, first) == []


def test_an_export_whose_sender_dies_every_time_fails_visibly(sessions):
    """A claimed attempt that never records an outcome (the io worker killed mid-send) is claimed again once
    its hold runs out; after the last allowed attempt the export is FAILED, not retried forever."""
    job_id = ready_job(sessions, "1.2.3.18")
    complete_job(sessions, claim_job(sessions, job_id, "host:1", timedelta(seconds=60)), {}, 0.5, {}, "m", [
        ("pacs", "1.2.9.10", "/r/SR.dcm")])
    for attempt in (1, 2, 3):
        (claimed,) = claim_due(sessions, job_id, timedelta(seconds=300), 3)
        assert claimed.attempt == attempt
        with sessions.begin() as session:  # the sender died: its hold runs out with nothing recorded
            session.execute(update(Export).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
    assert claim_due(sessions, job_id, timedelta(seconds=300), 3) == []
    with sessions() as session:
        export = session.scalars(select(Export)).one()
    assert export.state == ExportState.FAILED and export.attempts == 3 and "without an outcome" in export.error
    assert retry_failed(sessions) == 1  # and retry-exports gives it a fresh budget


def test_a_job_left_queued_with_no_worker_taking_it_is_sent_again(sessions):
    """Its message may be lost (a broker restarted without it, a retry whose send failed after QUEUED was
    recorded): the scheduler sends it again once it has waited QUEUED_RESEND_AFTER, not before, not twice."""
    from dicom_node.scheduler import QUEUED_RESEND_AFTER, Scheduler
    from dicom_node.settings import Settings

    job_id = ready_job(sessions, "1.2.3.14")
    sent = []
    scheduler = Scheduler(Settings(), sessions, lambda job: sent.append(job) or f"task-{len(sent)}", lambda job: "")
    scheduler.tick()
    assert sent == [job_id]  # READY -> sent, QUEUED
    scheduler._last_stale_check = 0.0
    scheduler.tick()
    assert sent == [job_id]  # a queue wait is not a lost message
    with sessions.begin() as session:
        session.execute(update(Job).values(updated_at=utcnow() - QUEUED_RESEND_AFTER - timedelta(seconds=1)))
    other = ready_job(sessions, "1.2.3.15")
    claim_job(sessions, other, "host:1", timedelta(seconds=60))  # a worker is busy: a backlog, not a lost message
    scheduler._last_stale_check = 0.0
    scheduler.tick()
    assert sent == [job_id]
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == other).values(state=JobState.DONE))
    scheduler._last_stale_check = 0.0
    scheduler.tick()
    scheduler._last_stale_check = 0.0
    scheduler.tick()
    assert sent == [job_id, job_id]
    with sessions() as session:
        assert session.get(Job, job_id).task_id == "task-2"


def test_a_restart_releases_only_the_jobs_of_workers_that_are_gone(sessions):
    """Embedded mode: on start the node sends again at once the jobs its dead workers held; a worker still
    alive (left running by a node that was killed) keeps its job, which must not run twice at once."""
    import os
    import socket
    import subprocess
    import sys

    from dicom_node.scheduler import Scheduler, worker_gone
    from dicom_node.settings import Settings

    host = socket.gethostname()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead, alive = f"{host}:{finished.stdout.strip()}", f"{host}:{os.getpid()}"
    assert worker_gone(dead) and not worker_gone(alive) and not worker_gone("elsewhere:1")
    assert not worker_gone("no-pid")
    lost, kept = ready_job(sessions, "1.2.3.19"), ready_job(sessions, "1.2.3.20")
    claim_job(sessions, lost, dead, timedelta(seconds=60))
    claim_job(sessions, kept, alive, timedelta(seconds=60))
    sent = []
    scheduler = Scheduler(Settings(), sessions, lambda job: sent.append(job) or "task", lambda job: "")
    assert scheduler.reconcile(release_running=True) == [lost] and sent == [lost]
    assert job_state(sessions, kept) == JobState.RUNNING
    waiting = ready_job(sessions, "1.2.3.21")
    queue_job(sessions, waiting, "task-w")  # its message may have been held by the worker that dies now
    sent.clear()
    assert scheduler.worker_died(alive) == sorted([kept, waiting, lost]) and sorted(sent) == sorted(
        [kept, waiting, lost])


def test_a_stale_job_is_queued_and_sent_once_not_every_round(sessions):
    """While no worker can take a stale job (the workers are down), it is not sent again every round: it goes
    back to QUEUED once, and a lost message is sent again only after the long-queued wait."""
    from dicom_node.scheduler import Scheduler
    from dicom_node.settings import Settings

    job_id = ready_job(sessions, "1.2.3.22")
    old = claim_job(sessions, job_id, "host:1", timedelta(seconds=60))
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=300)))
    sent = []
    scheduler = Scheduler(Settings(job_stale_seconds=60), sessions, lambda job: sent.append(job) or "task",
                          lambda job: "")
    for _ in range(3):
        scheduler._last_stale_check = 0.0
        scheduler.tick()
    assert sent == [job_id] and job_state(sessions, job_id) == JobState.QUEUED
    assert not complete_job(sessions, old, {}, 0.1, {}, "m", [])  # the old attempt's lease is void
    assert claim_job(sessions, job_id, "host:2", timedelta(seconds=60)).attempt == 2


def test_a_worker_host_whose_clock_runs_behind_does_not_look_stale_on_postgresql(sessions, monkeypatch):
    """Heartbeats are written and judged by PostgreSQL's clock: a GPU host ten minutes behind keeps its job.
    (SQLite serves one host, whose clock is the one clock.)"""
    import worklist.state as state

    if sessions.kw["bind"].dialect.name != "postgresql":
        with sessions() as session:
            assert state.heartbeat_clock(session) <= utcnow()
        return
    job_id = ready_job(sessions, "1.2.3.23")
    with monkeypatch.context() as behind:
        behind.setattr(state, "utcnow", lambda: utcnow() - timedelta(minutes=10))
        claim = claim_job(sessions, job_id, "slow-clock:1", timedelta(seconds=120))
        assert heartbeat(sessions, claim)
    assert stale_running_jobs(sessions, timedelta(seconds=120)) == []
