"""Export rows: one result object for one destination, PENDING until delivered or visibly FAILED, or
SUPERSEDED by a newer analysis of its study before it was delivered (``worklist.state.complete_job``).

A sender claims an attempt with a compare-and-set on the attempt count and the due time, and pushes the due
time past the send; so two senders never send the same export at once, and a DELIVERED row is never sent
again (``retry-exports`` only touches FAILED rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from worklist.models import Export, ExportState, utcnow
from worklist.redaction import redacted

log = logging.getLogger(__name__)

MAX_BACKOFF = timedelta(minutes=15)


@dataclass(frozen=True)
class ExportAttempt:
    """One claimed attempt to send one object to one destination."""

    export_id: int
    destination: str
    sop_instance_uid: str
    path: str
    attempt: int


def backoff(first: float, attempt: int) -> timedelta:
    """``first`` seconds doubled per attempt, capped at 15 minutes."""
    return min(timedelta(seconds=first * 2 ** max(attempt - 1, 0)), MAX_BACKOFF)


def claim_due(sessions: sessionmaker[Session], job_id: int, hold: timedelta,
              max_attempts: int) -> list[ExportAttempt]:
    """Claim the next attempt of every due PENDING export of a job. A claimed export is not due again for
    ``hold`` (longer than a send takes), so a duplicate task finds nothing to send. One due again after
    ``max_attempts`` claims had no outcome recorded for its last (its sender died mid-send, each time): FAILED."""
    now = utcnow()
    with sessions() as session:
        rows = session.execute(select(Export.id, Export.attempts).where(
            Export.job_id == job_id, Export.state == ExportState.PENDING, Export.next_attempt_at <= now)
            .order_by(Export.id)).all()
    attempts = []
    for export_id, seen in rows:
        with sessions.begin() as session:
            if seen >= max_attempts:
                _fail_unrecorded(session, export_id, seen, now)
                continue
            won = session.execute(update(Export).where(
                Export.id == export_id, Export.state == ExportState.PENDING, Export.attempts == seen,
                Export.next_attempt_at <= now).values(
                attempts=seen + 1, last_attempt_at=now, next_attempt_at=now + hold)).rowcount
            if won:
                row = session.get(Export, export_id)
                attempts.append(ExportAttempt(export_id, row.destination, row.sop_instance_uid, row.path, seen + 1))
    return attempts


def _fail_unrecorded(session: Session, export_id: int, seen: int, now: datetime) -> None:
    failed = session.execute(update(Export).where(
        Export.id == export_id, Export.state == ExportState.PENDING, Export.attempts == seen,
        Export.next_attempt_at <= now).values(
        state=ExportState.FAILED, next_attempt_at=None,
        error=f"{seen} attempts ended without an outcome (the sending worker stopped mid-send each time)")).rowcount
    if failed:
        row = session.get(Export, export_id)
        log.error("export of %s to %s FAILED: %d attempts ended without an outcome (`mammo-node retry-exports` "
                  "sends it again)", row.sop_instance_uid, row.destination, seen)


def extend_claims(sessions: sessionmaker[Session], attempts: list[ExportAttempt], hold: timedelta) -> None:
    """Push the claims of attempts still being sent ``hold`` past now, so that a slow send (a large batch to a
    slow PACS) is not claimed and sent again beside it."""
    with sessions.begin() as session:
        for attempt in attempts:
            session.execute(update(Export).where(
                Export.id == attempt.export_id, Export.state == ExportState.PENDING,
                Export.attempts == attempt.attempt).values(next_attempt_at=utcnow() + hold))


def mark_delivered(sessions: sessionmaker[Session], attempt: ExportAttempt) -> None:
    """DELIVERED, whichever attempt stored it (a delivery is the truth, even from an attempt overtaken by a
    newer claim)."""
    with sessions.begin() as session:
        session.execute(update(Export).where(Export.id == attempt.export_id).values(
            state=ExportState.DELIVERED, delivered_at=utcnow(), error=None, next_attempt_at=None))


def mark_failed_attempt(sessions: sessionmaker[Session], attempt: ExportAttempt, error: str, max_attempts: int,
                        first_backoff: float) -> ExportState:
    """PENDING with the next attempt after the backoff, or FAILED once the attempts are spent. An attempt that
    a newer claim overtook (its hold ran out mid-send) changes nothing: the newer attempt decides. The error is
    recorded and logged without the study's patient identifiers."""
    final = attempt.attempt >= max_attempts
    state = ExportState.FAILED if final else ExportState.PENDING
    with sessions.begin() as session:
        error = redacted(session, error, export_id=attempt.export_id)
        changed = session.execute(
            update(Export).where(Export.id == attempt.export_id, Export.state == ExportState.PENDING,
                                 Export.attempts == attempt.attempt)
            .values(state=state, error=error[:4000],
                    next_attempt_at=None if final else utcnow() + backoff(first_backoff, attempt.attempt))).rowcount
    if not changed:
        log.info("export of %s to %s attempt %d failed after a newer attempt or a delivery: not recorded",
                 attempt.sop_instance_uid, attempt.destination, attempt.attempt)
        return state
    log_call = log.error if final else log.warning
    log_call("export of %s to %s attempt %d %s: %s", attempt.sop_instance_uid, attempt.destination, attempt.attempt,
             "FAILED (no more retries; `mammo-node retry-exports` sends it again)" if final else "failed", error[:300])
    return state


def jobs_with_due_exports(sessions: sessionmaker[Session], now: datetime | None = None) -> dict[int, datetime]:
    """Jobs with a PENDING export whose next attempt is due, each with its latest due time (a new due time
    means a new attempt is wanted)."""
    now = now or utcnow()
    with sessions() as session:
        return dict(session.execute(select(Export.job_id, func.max(Export.next_attempt_at)).where(
            Export.state == ExportState.PENDING, Export.next_attempt_at <= now).group_by(Export.job_id)).all())


def retry_failed(sessions: sessionmaker[Session]) -> int:
    """FAILED exports -> PENDING with a fresh attempt budget, due now; returns how many."""
    with sessions.begin() as session:
        return session.execute(update(Export).where(Export.state == ExportState.FAILED).values(
            state=ExportState.PENDING, attempts=0, next_attempt_at=utcnow())).rowcount

