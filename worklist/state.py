"""The job state machine, UPS-like: READY -> QUEUED -> RUNNING -> DONE / FAILED (study: RECEIVING first).

Every transition is one transaction and a compare-and-set on the job's state, so a message delivered twice
(a redelivery after a worker crash, a reconcile after a restart) never runs a job twice at the same time and
never records two results. A worker owns a RUNNING job through a ``lease`` token and keeps it alive with
heartbeats; a RUNNING job whose heartbeat is older than the stale limit may be claimed again.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from worklist.completeness import SCREENING_VIEW_NAMES, present_views
from worklist.models import Export, ExportState, Job, JobState, Result, Study, StudyState, utcnow
from worklist.redaction import redacted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """A worker's hold on a RUNNING job."""

    job_id: int
    lease: str
    attempt: int
    study_instance_uid: str


def queue_job(sessions: sessionmaker[Session], job_id: int, task_id: str,
              from_states: tuple[JobState, ...] = (JobState.READY,)) -> bool:
    """READY (or, for a re-send, QUEUED/RUNNING) -> QUEUED under a new task id."""
    with sessions.begin() as session:
        return bool(session.execute(update(Job).where(Job.id == job_id, Job.state.in_(from_states)).values(
            state=JobState.QUEUED, task_id=task_id, lease=None, updated_at=utcnow())).rowcount)


def claim_job(sessions: sessionmaker[Session], job_id: int, worker: str, stale_after: timedelta) -> Claim | None:
    """READY or QUEUED (or RUNNING with a stale heartbeat) -> RUNNING with a fresh lease; None if another
    worker holds it or it is finished. READY is accepted because a task may arrive before its sender has
    recorded QUEUED."""
    lease = uuid.uuid4().hex
    with sessions.begin() as session:
        now = heartbeat_clock(session)
        claimed = session.execute(update(Job).where(Job.id == job_id, or_(
            Job.state.in_((JobState.READY, JobState.QUEUED)),
            and_(Job.state == JobState.RUNNING, Job.heartbeat_at < now - stale_after))).values(
            state=JobState.RUNNING, lease=lease, worker=worker[:128], attempts=Job.attempts + 1,
            started_at=now, heartbeat_at=now, updated_at=now)).rowcount
        if not claimed:
            return None
        attempt, study_uid = session.execute(select(Job.attempts, Study.study_instance_uid).join(Study).where(
            Job.id == job_id)).one()
    return Claim(job_id, lease, attempt, study_uid)


def heartbeat(sessions: sessionmaker[Session], claim: Claim) -> bool:
    """Refresh the heartbeat; False when the lease was lost (the job was claimed by someone else)."""
    with sessions.begin() as session:
        return bool(session.execute(update(Job).where(Job.id == claim.job_id, Job.lease == claim.lease).values(
            heartbeat_at=heartbeat_clock(session))).rowcount)


def heartbeat_clock(session: Session) -> datetime:
    """The time heartbeats are written and judged by: PostgreSQL's clock, the same for every host (a worker
    host whose clock runs behind would otherwise look stale, and its live job be taken over); this host's on
    SQLite, which one host uses."""
    if session.get_bind().dialect.name == "postgresql":
        return session.scalar(select(func.now()))
    return utcnow()


def complete_job(sessions: sessionmaker[Session], claim: Claim, findings: dict[str, Any], suspicion: float,
                 timings: dict[str, float], model_version: str, exports: list[tuple[str, str, str]], *,
                 gpu_memory_peak_bytes: int | None = None) -> bool:
    """RUNNING -> DONE: the result row, the study's score and state, and one PENDING export per
    (destination, SOP Instance UID, path), in one transaction. False (nothing written) if the lease was lost.
    ``gpu_memory_peak_bytes`` (the analysis' peak CUDA memory; None off CUDA) is recorded on the job.

    A study that received instances after the job was created goes back to RECEIVING, so it is analysed
    again with everything it has (the new SR supersedes this one).
    """
    now = utcnow()
    with sessions.begin() as session:
        finished = session.execute(update(Job).where(
            Job.id == claim.job_id, Job.lease == claim.lease, Job.state == JobState.RUNNING).values(
            state=JobState.DONE, finished_at=now, updated_at=now, timings=timings, error=None,
            model_version=model_version[:128], gpu_memory_peak_bytes=gpu_memory_peak_bytes)).rowcount
        if not finished:
            return False
        job = session.get(Job, claim.job_id)
        session.add(Result(job_id=job.id, scores=findings, suspicion=suspicion))
        for destination, sop_uid, path in exports:
            session.add(Export(job_id=job.id, destination=destination, sop_instance_uid=sop_uid, path=path,
                               state=ExportState.PENDING, next_attempt_at=now))
        _supersede_older_exports(session, job)
        _settle_study(session, job, StudyState.ANALYSED, suspicion,
                      all_views_analysed=not findings.get("missing_views"))
    log.info("job %d done for study %s (suspicion %.3f)", claim.job_id, claim.study_instance_uid, suspicion,
             extra={"study_uid": claim.study_instance_uid, "job_id": claim.job_id})
    return True


def _supersede_older_exports(session: Session, job: Job) -> None:
    """The study's earlier jobs' exports not delivered (PENDING, or FAILED and so open to ``retry-exports``) ->
    SUPERSEDED: an older SR or SEG that reached the PACS after this job's would read as the latest."""
    older = select(Job.id).where(Job.study_id == job.study_id, Job.id < job.id)
    count = session.execute(update(Export).where(
        Export.job_id.in_(older), Export.state.in_((ExportState.PENDING, ExportState.FAILED))).values(
        state=ExportState.SUPERSEDED, next_attempt_at=None,
        error=f"superseded by job {job.id}'s results before it was delivered")).rowcount
    if count:
        log.info("job %d: %d undelivered export(s) of earlier jobs of its study superseded", job.id, count,
                 extra={"job_id": job.id})


def fail_job(sessions: sessionmaker[Session], claim: Claim, error: str, retry: bool) -> JobState | None:
    """RUNNING -> QUEUED (``retry``: the caller re-sends it) or FAILED with the error text, recorded and logged
    without the study's patient identifiers; None if the lease was lost."""
    now = utcnow()
    state = JobState.QUEUED if retry else JobState.FAILED
    with sessions.begin() as session:
        error = redacted(session, error, job_id=claim.job_id)
        changed = session.execute(update(Job).where(
            Job.id == claim.job_id, Job.lease == claim.lease, Job.state == JobState.RUNNING).values(
            state=state, error=error[:4000], lease=None, updated_at=now,
            finished_at=None if retry else now)).rowcount
        if not changed:
            return None
        if state == JobState.FAILED:
            _settle_study(session, session.get(Job, claim.job_id), StudyState.FAILED, None)
    log.warning("job %d for study %s %s after attempt %d: %s", claim.job_id, claim.study_instance_uid,
                "will be retried" if retry else "FAILED", claim.attempt, error[:300],
                extra={"study_uid": claim.study_instance_uid, "job_id": claim.job_id})
    return state


def _settle_study(session: Session, job: Job, state: StudyState, suspicion: float | None,
                  all_views_analysed: bool = False) -> None:
    """The study of a finished job: ``state``, or RECEIVING when a new or changed analysable instance came after
    the job was promoted (its revision moved on), so that it is analysed again. The study's row is locked first
    (PostgreSQL: FOR UPDATE waits for a Storage SCP transaction writing it, and reads its outcome).

    An ANALYSED study ranks with the complete ones only when the analysis used all four views
    (``all_views_analysed``; a view received but unreadable was left out) and all four are there; a FAILED one
    keeps no suspicion (an earlier analysis' score is not the study's as it is now)."""
    study = session.get(Study, job.study_id, with_for_update=True, populate_existing=True)
    late = study.revision > job.study_revision
    study.state = StudyState.RECEIVING if late else state
    if suspicion is not None or study.state == StudyState.FAILED:
        study.suspicion = suspicion
    if study.state == StudyState.ANALYSED:
        study.views_complete = all_views_analysed and study.suspicion is not None and present_views(
            session, study.id) == set(SCREENING_VIEW_NAMES)


def stale_running_jobs(sessions: sessionmaker[Session], stale_after: timedelta,
                       now: datetime | None = None) -> list[int]:
    """RUNNING jobs whose worker has not sent a heartbeat for ``stale_after``."""
    with sessions() as session:
        now = now or heartbeat_clock(session)
        return list(session.scalars(select(Job.id).where(
            Job.state == JobState.RUNNING, Job.heartbeat_at < now - stale_after)).all())


def requeue_stale_jobs(sessions: sessionmaker[Session], stale_after: timedelta) -> list[tuple[int, str]]:
    """RUNNING jobs whose heartbeat is stale -> QUEUED (their lease void), each in one compare-and-set; returns
    them with the worker that held them (so that a supervisor can end a hung one). The caller sends each once.
    Left RUNNING, they were sent again every round for as long as no worker took them (an outage of the
    workers: a message per job every ``stale_after`` / 4); QUEUED, a lost message is sent again only after
    ``long_queued_jobs``' wait. A worker that was alive after all finds its lease gone."""
    requeued = []
    for job_id in stale_running_jobs(sessions, stale_after):
        with sessions.begin() as session:
            cutoff = heartbeat_clock(session) - stale_after
            worker = session.scalar(select(Job.worker).where(Job.id == job_id))
            if _back_on_queue(session, Job.id == job_id, Job.heartbeat_at < cutoff):
                requeued.append((job_id, worker or ""))
    return requeued


def _back_on_queue(session: Session, *conditions: ColumnElement[bool]) -> int:
    """RUNNING jobs that meet ``conditions`` -> QUEUED, their lease void; returns how many."""
    return session.execute(update(Job).where(Job.state == JobState.RUNNING, *conditions).values(
        state=JobState.QUEUED, lease=None, updated_at=utcnow())).rowcount


def long_queued_jobs(sessions: sessionmaker[Session], queued_for: timedelta, now: datetime | None = None) -> list[int]:
    """QUEUED jobs that no worker took and nobody sent again for ``queued_for``, while no job is RUNNING: their
    message may be lost (a broker restarted without it, a retry whose send failed after QUEUED was recorded).
    While a job runs the workers are draining a backlog, and a long wait is only that. A second message is
    harmless: the job is claimed once."""
    now = now or utcnow()
    with sessions() as session:
        if session.scalar(select(Job.id).where(Job.state == JobState.RUNNING).limit(1)) is not None:
            return []
        return list(session.scalars(select(Job.id).where(
            Job.state == JobState.QUEUED, Job.updated_at < now - queued_for).order_by(Job.id)).all())


def jobs_to_resend(sessions: sessionmaker[Session], stale_after: timedelta) -> list[int]:
    """READY and QUEUED jobs, and stale RUNNING ones: the jobs that may have no live task (reconcile)."""
    with sessions() as session:
        waiting = session.scalars(select(Job.id).where(Job.state.in_((JobState.READY, JobState.QUEUED)))).all()
    return sorted({*waiting, *stale_running_jobs(sessions, stale_after)})


def release_jobs_of(sessions: sessionmaker[Session], worker: str) -> list[int]:
    """RUNNING jobs of a worker known to be dead -> QUEUED, to be sent again at once."""
    with sessions.begin() as session:
        ids = list(session.scalars(select(Job.id).where(Job.state == JobState.RUNNING, Job.worker == worker)).all())
        if ids:
            _back_on_queue(session, Job.id.in_(ids))
    for job_id in ids:
        log.warning("job %d was running on worker %s, which died: it will be sent again", job_id, worker)
    return ids


def earlier_done_jobs(sessions: sessionmaker[Session], job_id: int) -> list[int]:
    """The ids of the DONE jobs of this job's study created before it, oldest first: the analyses whose
    results this one's supersede."""
    with sessions() as session:
        study_id = select(Job.study_id).where(Job.id == job_id).scalar_subquery()
        return list(session.scalars(select(Job.id).where(Job.study_id == study_id, Job.id < job_id,
                                                         Job.state == JobState.DONE).order_by(Job.id)))


def job_state(sessions: sessionmaker[Session], job_id: int) -> JobState | None:
    with sessions() as session:
        return session.scalar(select(Job.state).where(Job.id == job_id))
