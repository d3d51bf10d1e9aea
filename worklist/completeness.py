"""When a study is ready for analysis: the four screening views are in, or no instance came for a while.

A study becomes READY (and gets a READY job) in one transaction, guarded by a compare-and-set on its state,
so two schedulers can never create two jobs for the same arrival.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, bindparam, exists, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from worklist.models import Instance, Job, JobState, Study, StudyState, utcnow

log = logging.getLogger(__name__)

Turn = Callable[[], AbstractContextManager[object]]  # a writers' turn (``worklist.writers.WriterQueue.turn``)

SCREENING_VIEW_NAMES = ("LCC", "RCC", "LMLO", "RMLO")
PROMOTION_BATCH = 32  # studies promoted in one transaction


# Built once, run on the transaction's connection: a released association's studies are checked with one query
# of their views and one compare-and-set per study, not with ORM statements per study (that was ~20% of a Storage
# SCP process's interpreter time when every association touched 16 studies).
_RECEIVING_BY_UID = select(Study.study_instance_uid, Study.id).where(
    Study.study_instance_uid.in_(bindparam("study_uids", expanding=True)), Study.state == StudyState.RECEIVING)
_ANALYSABLE_VIEWS = select(Instance.study_id, Instance.laterality, Instance.view).where(
    Instance.study_id.in_(bindparam("study_ids", expanding=True)), Instance.analysable.is_(True))
_CLAIM = update(Study).where(Study.id == bindparam("study_id"), Study.state == StudyState.RECEIVING,
                             Study.last_received_at <= bindparam("cutoff")).values(state=StudyState.READY).returning(
    Study.revision)  # the revision its job analyses (``worklist.state``)
_NEW_JOB = insert(Job).returning(Job.id)


def view_name(laterality: str | None, view: str | None) -> str:
    """``("L", "CC")`` -> ``"LCC"``."""
    return f"{laterality or ''}{view or ''}".upper()


def present_views(session: Session, study_id: int) -> set[str]:
    """The screening views among a study's analysable instances."""
    return present_views_of(session.connection(), [study_id])[study_id]


def present_views_of(connection: Connection, study_ids: Sequence[int]) -> dict[int, set[str]]:
    """``present_views`` of each study, in one query."""
    present: dict[int, set[str]] = {study_id: set() for study_id in study_ids}
    for study_id, laterality, view in connection.execute(_ANALYSABLE_VIEWS, {"study_ids": list(present)}):
        if (name := view_name(laterality, view)) in SCREENING_VIEW_NAMES:
            present[study_id].add(name)
    return present


def missing_views(present: set[str]) -> list[str]:
    return [name for name in SCREENING_VIEW_NAMES if name not in present]


@dataclass(frozen=True)
class Readiness:
    """How long a study waits: ``settle`` once all four views are in, ``timeout`` otherwise."""

    settle: timedelta
    timeout: timedelta

    @classmethod
    def from_seconds(cls, settle: float, timeout: float) -> Readiness:
        return cls(timedelta(seconds=settle), timedelta(seconds=timeout))


def promote_ready_studies(sessions: sessionmaker[Session], readiness: Readiness,
                          now: datetime | None = None, turn: Turn = nullcontext,
                          busy: Collection[str] = ()) -> list[int]:
    """Mark RECEIVING studies READY and create their jobs; returns the new job ids. ``busy``: study UIDs a
    sender is still sending (``dicom_node.release.ReleaseTracker.busy``), left for now.

    Only studies with at least one analysable (MG) instance are considered: a study of other modalities is
    stored and never analysed. Each transaction is written in a ``turn`` of the database's writers (on SQLite,
    so that the Storage SCP's writers never sleep on SQLite's busy handler behind it).
    """
    now = now or utcnow()
    with sessions() as session:
        candidates = session.execute(select(Study.study_instance_uid, Study.id).where(
            Study.state == StudyState.RECEIVING, Study.last_received_at <= now - readiness.settle,
            exists().where(Instance.study_id == Study.id, Instance.analysable.is_(True)))).all()
    return _promote_all(sessions, [row for row in candidates if row[0] not in busy], readiness, now, turn)


def promote_studies(sessions: sessionmaker[Session], study_uids: list[str], readiness: Readiness,
                    now: datetime | None = None, turn: Turn = nullcontext) -> list[int]:
    """``promote_ready_studies`` for the named studies only (those still RECEIVING); returns the new job ids."""
    now = now or utcnow()
    with sessions() as session:
        candidates = session.connection().execute(_RECEIVING_BY_UID, {"study_uids": study_uids}).all()
    return _promote_all(sessions, candidates, readiness, now, turn)


def _promote_all(sessions: sessionmaker[Session], candidates: Sequence[tuple[str, int]], readiness: Readiness,
                 now: datetime, turn: Turn) -> list[int]:
    """Promote the candidates ``(study UID, id)``, in UID order (Python's, as the Storage SCP sorts its
    instances, not the database's collation), in transactions of up to ``PROMOTION_BATCH`` studies,
    each in one writers' turn and one commit (a released association's studies, say: one fsync of the database,
    not one per study). The Storage SCP's transactions lock study rows in the same order
    (``dicom_node.storage``), so that they and the promotions never wait for each other in a cycle on
    PostgreSQL. A failure rolls back its batch only; the scheduler promotes those studies on its next round."""
    created = []
    ordered = sorted(candidates)
    for start in range(0, len(ordered), PROMOTION_BATCH):
        with turn(), sessions.begin() as session:
            promoted = _promote_batch(session.connection(), ordered[start:start + PROMOTION_BATCH], readiness, now)
        for job_id, study_uid, absent in promoted:  # committed: only now are they ready
            log.info("study %s is ready (job %d)%s", study_uid, job_id,
                     f"; missing views {', '.join(absent)}" if absent else "",
                     extra={"study_uid": study_uid, "job_id": job_id})
            created.append(job_id)
    return created


def _promote_batch(connection: Connection, batch: Sequence[tuple[str, int]], readiness: Readiness,
                   now: datetime) -> list[tuple[int, str, list[str]]]:
    """Claim each study of ``batch`` that is ready (compare-and-set on its state, in the batch's order) and add its
    READY job: (job id, study UID, missing views) for each claimed; a study not ready, or claimed by another
    promotion meanwhile, is left as it is."""
    present = present_views_of(connection, [study_id for _, study_id in batch])
    promoted = []
    for study_uid, study_id in batch:
        wait = readiness.settle if len(present[study_id]) == len(SCREENING_VIEW_NAMES) else readiness.timeout
        revision = connection.execute(_CLAIM, {"study_id": study_id, "cutoff": now - wait}).scalar()
        if revision is not None:
            job_id = connection.execute(_NEW_JOB, {"study_id": study_id, "state": JobState.READY,
                                                   "study_revision": revision}).scalar_one()
            promoted.append((job_id, study_uid, missing_views(present[study_id])))
    return promoted
