"""The node's scheduler: promotes complete studies, sends their jobs to the workers, and re-sends what was lost.

It runs in the node process (``mammo-node serve``), ticking a few times a second. The database is the truth:
a message that never arrived, or whose worker died, is found again from the job and export rows.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Collection
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.settings import Settings
from worklist.completeness import Readiness, promote_ready_studies
from worklist.drift import DriftWatch
from worklist.exports import jobs_with_due_exports
from worklist.models import Job, JobState
from worklist.state import jobs_to_resend, long_queued_jobs, queue_job, release_jobs_of, requeue_stale_jobs
from worklist.writers import WriterQueue

log = logging.getLogger(__name__)

Sender = Callable[[int], str]
# A QUEUED job no worker took for this long is sent again: longer than the longest retry countdown of the
# analysis task (600 s), so that a retry waiting in the broker is not doubled.
QUEUED_RESEND_AFTER = timedelta(minutes=15)


def worker_gone(worker: str) -> bool:
    """Whether a worker (``host:pid``, ``dicom_node.tasks.worker_name``) is known to be gone: a process of this
    host that no longer exists. Another host's, or an unreadable name, is not known gone."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


class Scheduler:
    """Promote, dispatch and reconcile; ``send_analysis``/``send_export`` put a job id on a queue."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], send_analysis: Sender,
                 send_export: Sender) -> None:
        self.sessions = sessions
        self.writers = WriterQueue.for_engine(sessions.kw["bind"])  # promotions queue with the SCP's writers
        self.readiness = Readiness.from_seconds(settings.study_settle_seconds, settings.study_inactivity_timeout)
        self.stale = timedelta(seconds=settings.job_stale_seconds)
        self.send_analysis = send_analysis
        self.send_export = send_export
        self.export_hold = 60.0
        self._exports_sent: dict[int, tuple[datetime, float]] = {}  # job -> (due time sent for, when)
        self._last_stale_check = 0.0
        self.drift = DriftWatch(settings)
        self.wake = threading.Event()  # set to tick now (a study just became READY) rather than at the interval
        # the studies senders are still sending (``ReleaseTracker.busy`` of an in-process SCP): not settled yet
        self.busy: Callable[[], Collection[str]] = frozenset
        # told the worker of each job whose heartbeat went stale (the node ends its own worker: hung)
        self.on_stale: Callable[[str], None] = lambda worker: None

    def dispatch(self, job_id: int) -> None:
        """Send the job, then record QUEUED (a READY or QUEUED job; a task that wins the race is fine)."""
        task_id = self.send_analysis(job_id)
        queue_job(self.sessions, job_id, task_id, from_states=(JobState.READY, JobState.QUEUED))
        log.info("job %d sent to the workers (task %s)", job_id, task_id)

    def reconcile(self, release_running: bool) -> list[int]:
        """On start: send again every job with no live task. ``release_running`` (embedded mode: the worker is
        ours and we are just starting): the RUNNING jobs of this host's workers whose process is gone go back
        on the queue at once; one still alive (a worker left running by a node that was killed, or another
        node's) keeps its job, which goes stale if it never finishes."""
        if release_running:
            with self.sessions() as session:
                workers = set(session.scalars(select(Job.worker).where(Job.state == JobState.RUNNING)).all())
            for worker in workers:
                if worker_gone(worker or ""):
                    release_jobs_of(self.sessions, worker or "")
        job_ids = jobs_to_resend(self.sessions, self.stale)
        for job_id in job_ids:
            self.dispatch(job_id)
        if job_ids:
            log.warning("reconcile: re-sent %d job(s) with no live task: %s", len(job_ids), job_ids)
        return job_ids

    def worker_died(self, worker: str) -> list[int]:
        """A supervised worker process exited: its RUNNING jobs go back on the queue at once, and every QUEUED
        job is sent again (the dead worker may have held their messages, such as retries waiting for their
        countdown; a duplicate finds the job taken and does nothing)."""
        release_jobs_of(self.sessions, worker)  # RUNNING -> QUEUED: sent below with the others
        with self.sessions() as session:
            job_ids = list(session.scalars(select(Job.id).where(Job.state == JobState.QUEUED).order_by(Job.id)))
        for job_id in job_ids:
            self.dispatch(job_id)
        return job_ids

    def tick(self) -> None:
        """One round: new READY studies, READY jobs, stale RUNNING jobs, long-QUEUED jobs, due exports, and (when
        due) score drift."""
        promote_ready_studies(self.sessions, self.readiness, turn=self.writers.turn, busy=self.busy())
        with self.sessions() as session:
            ready = session.scalars(select(Job.id).where(Job.state == JobState.READY).order_by(Job.id)).all()
        for job_id in ready:
            self.dispatch(job_id)
        now = time.monotonic()
        if now - self._last_stale_check > self.stale.total_seconds() / 4:
            self._last_stale_check = now
            for job_id, worker in requeue_stale_jobs(self.sessions, self.stale):
                log.warning("job %d has a stale heartbeat: back on the queue", job_id)
                self.on_stale(worker)
                self.dispatch(job_id)
            for job_id in long_queued_jobs(self.sessions, QUEUED_RESEND_AFTER):
                log.warning("job %d has waited QUEUED for %s with no worker taking it: sending it again", job_id,
                            QUEUED_RESEND_AFTER)
                self.dispatch(job_id)
        self._exports_sent = {k: v for k, v in self._exports_sent.items() if now - v[1] < self.export_hold}
        for job_id, due in jobs_with_due_exports(self.sessions).items():
            if self._exports_sent.get(job_id, (None,))[0] != due:  # not yet sent for this attempt
                self.send_export(job_id)
                self._exports_sent[job_id] = (due, now)
        if self.drift.due(now):
            self.drift.check(self.sessions, now)

    def run(self, stop: threading.Event, interval: float = 0.25) -> None:
        """Tick every ``interval`` or when woken, until ``stop`` is set (set ``wake`` too, to stop at once); an
        error in one tick (DB or broker down) is logged and retried."""
        while True:
            self.wake.wait(interval)
            self.wake.clear()
            if stop.is_set():
                return
            try:
                self.tick()
            except Exception as error:
                log.error("scheduler tick failed (will retry): %s: %s", type(error).__name__, error)
