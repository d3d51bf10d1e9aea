"""The Celery app: ``analyze_study`` (queue ``gpu``) and ``export_results`` (queue ``io``).

Jobs live in the worklist database; a message only says "look at job N". Tasks ack late and are rejected
back to the queue when their worker dies, and a job's state machine (``worklist.state``) makes every
delivery after the first a no-op, so a redelivered or re-sent message never runs a study twice.

Broker: ``settings.broker_url`` (Redis in production), else an embedded SQLite broker file in the data
directory (kombu's SQLAlchemy transport), which keeps queued messages on disk with no server to install.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from celery import Celery, Task
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.settings import Settings
from models.errors import ConfigurationError, ImageDecodeError, NotMammographyError

if TYPE_CHECKING:
    from dicom_node.analysis import AnalysisOutput
    from worklist.exports import ExportAttempt

log = logging.getLogger(__name__)

ANALYZE = "mammo_node.analyze_study"
EXPORT = "mammo_node.export_results"
GPU_QUEUE, IO_QUEUE = "gpu", "io"
PERMANENT_ERRORS = (ImageDecodeError, NotMammographyError)
EXPORT_HOLD_SECONDS = 300  # a claimed export is not due again for this long (longer than any send)
HUNG_EXIT_CODE = 75  # a worker process that ends a hung analysis (EX_TEMPFAIL)
MAX_RETRY_COUNTDOWN = 600  # seconds: the longest wait before an analysis is tried again

app = Celery("mammo_node")
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_routes={ANALYZE: {"queue": GPU_QUEUE}, EXPORT: {"queue": IO_QUEUE}},
    task_default_queue=IO_QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    task_serializer="json",
    accept_content=["json"],
)


def broker_url(settings: Settings) -> str:
    """The configured broker, or the embedded SQLite broker under the data directory."""
    return settings.broker_url or f"sqla+sqlite:///{(Path(settings.data_dir) / 'broker.sqlite').resolve()}"


def configure(settings: Settings) -> Celery:
    """Point the app at the node's broker; keep ``settings`` for the tasks of this process."""
    url = broker_url(settings)
    # Redis: an unacked message comes back after the visibility timeout (its worker died). A worker holds a
    # retry unacked until its countdown ends: the timeout outlasts the longest countdown, or it comes back early.
    visibility = max(settings.job_stale_seconds * 3, MAX_RETRY_COUNTDOWN + settings.job_stale_seconds)
    transport = {"visibility_timeout": int(visibility)} if url.startswith("redis") else {}
    if url.startswith("sqla"):
        # The embedded broker is polled (1 s by default). Its transport hands every transport option to
        # create_engine, so the interval is set on the class. 0.1 s keeps the queue wait small; an idle worker's
        # CPU, measured: 2.5% of a core at 0.2 s, 7.5% at 0.05 s.
        from kombu.transport import sqlalchemy

        sqlalchemy.Transport.polling_interval = 0.1
    if app._pool is not None:  # drop connections to a previous broker (a node restarted in this process)
        app._pool.force_close_all()
        app._pool = None
    if "amqp" in app.__dict__:
        app.amqp._producer_pool = None
    app.conf.update(broker_url=url, broker_transport_options=transport)
    _Context.current = _Context(settings)
    return app


def worker_name() -> str:
    """``host:pid`` of this process (recorded on the jobs it runs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class OverlayDrawer:
    """Draws each finished job's overlay PNGs in a background thread, so that the worker takes its next task at
    once (on a single-slot worker serving both queues, the job's export waited ~1-2 s behind them at 4096 x 3328).
    One job's overlays at a time: handing over the next waits for the previous, which bounds the images held to
    one study's. The PNGs are for people, not PACS: a failure is logged, and the API draws a missing overlay
    (malignancy or FActOR) again from its SEG."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="overlays")
        self._lock = threading.Lock()
        self._last: Future[None] | None = None

    def draw(self, job_id: int, output: AnalysisOutput) -> Future[None]:
        """Start drawing ``output``'s overlays (after the previous job's are done); returns their future."""
        with self._lock:
            if self._last is not None:
                self._last.result()
            self._last = self._executor.submit(_draw_overlays, job_id, output)
            return self._last


def _draw_overlays(job_id: int, output: AnalysisOutput) -> None:
    try:
        output.draw_overlays()
    except Exception as error:
        log.warning("job %d: overlay PNGs not drawn: %s: %s", job_id, type(error).__name__, error)


class _Context:
    """What a worker process needs, created lazily after fork: DB sessions and the loaded model."""

    current: _Context | None = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._analyzer = None
        self._served: tuple[str, str] | None = None  # (name, sha256) of the registry version loaded
        # a version whose weights or components are not the ones registered, and why: refused until another is
        # active
        self._refused: tuple[tuple[str, str] | None, ConfigurationError] | None = None

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        from worklist.db import make_engine, session_factory

        return session_factory(make_engine(self.settings.database_url()))

    @cached_property
    def overlays(self) -> OverlayDrawer:
        return OverlayDrawer()

    @cached_property
    def writer(self):
        """This worker's result writer (``settings.result_processes`` helpers), kept across model versions."""
        from dicom_node.results.writer import ResultWriter

        return ResultWriter(self.settings.result_processes, retain_memory=self.settings.retain_freed_memory)

    def start_writer(self) -> None:
        """Start the result writer's helpers now (a gpu worker at start), so that the first study does not wait
        for them; if they cannot start, the first job tries again."""
        try:
            helpers = self.writer.start()
        except Exception as error:
            log.warning("result-writer helpers did not start: %s: %s", type(error).__name__, error)
            return
        log.info("result writer: %d helper process(es) ready", len(helpers))

    @property
    def analyzer(self):
        """The analyzer of the model to serve now: the registry's active version, else the configured model.
        A version activated meanwhile is loaded before the next job, without a worker restart."""
        from training.registry import active_model, check_components

        with self._lock:  # the active version is read under the lock: no thread reloads one that was replaced
            active = active_model(self.sessions)
            wanted = (active.name, active.sha256) if active else None
            if self._refused is not None and self._refused[0] == wanted:  # not loaded and hashed again per job
                raise self._refused[1]
            if self._analyzer is None or wanted != self._served:
                self._analyzer = None  # the old model is let go before the new one loads (one model's memory)
                if active is not None:
                    try:
                        check_components(active.name, active.components, active.component_sha256)
                    except ConfigurationError as error:
                        self._refused = (wanted, error)
                        raise
                from dicom_node.analysis import Analyzer
                from dicom_node.heads import served_components
                from dicom_node.results.seg import SEG_TRANSFER_SYNTAXES
                from dicom_node.serving import load_serving_model, model_identity

                model = load_serving_model(self.settings, active.path if active else None,
                                           active.text_encoder_path if active else None, progress=False)
                if active is not None and model.load_report.sha256 != active.sha256:
                    self._refused = (wanted, ConfigurationError(
                        f"model version {active.name}: {active.path} is not the file registered (sha256 "
                        f"{active.sha256[:12]}, now {model.load_report.sha256[:12]}); register it under a new name"))
                    raise self._refused[1]
                identity = model_identity(model, active.name if active else None)
                self._analyzer = Analyzer(model, identity, self.settings.results_dir, writer=self.writer,
                                          seg_transfer_syntax=SEG_TRANSFER_SYNTAXES[self.settings.seg_compression],
                                          **served_components(active, model, identity,
                                                              self.settings.resolved_device()))
                self._served = wanted
                log.info("serving %s", f"model version {active.name}" if active else "the configured model")
            return self._analyzer


def context() -> _Context:
    if _Context.current is None:
        from dicom_node.settings import load_settings

        configure(load_settings())
    return _Context.current


class LeaseLostError(Exception):
    """This attempt's claim may belong to another worker now: it must not write the job's results."""


@dataclass
class _Heartbeat:
    """Refreshes a claimed job's heartbeat from a thread while the work runs; ``check`` (called between the
    analysis' stages, and before its results are written) stops an attempt whose lease was lost, or may have
    been: its beats have failed for ``stale`` seconds, long enough for another worker to claim the job. That
    worker writes the same files under the same UIDs: two attempts writing them would mix their contents."""

    sessions: sessionmaker[Session]
    claim: object
    interval: float
    stale: float
    limit: float  # past it the analysis is hung: ``on_hung`` (the process exits; its supervisor restarts it)
    on_hung: Callable[[], None] = lambda: os._exit(HUNG_EXIT_CODE)

    def __post_init__(self) -> None:
        self.lost = threading.Event()
        self.started = self.last_beat = time.monotonic()

    def check(self) -> None:
        if self.lost.is_set() or time.monotonic() - self.last_beat >= self.stale:
            raise LeaseLostError(f"job {self.claim.job_id} attempt {self.claim.attempt}: its lease was lost or "
                                 f"its heartbeat failed for {self.stale:.0f} s")

    @contextmanager
    def running(self) -> Iterator[None]:
        from worklist.state import heartbeat

        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.interval):
                if time.monotonic() - self.started > self.limit:  # no beat more: the job goes stale meanwhile
                    log.error("job %d attempt %d has run for more than %.0f s: taken as hung, the worker process "
                              "exits and the job is retried", self.claim.job_id, self.claim.attempt, self.limit)
                    self.on_hung()
                    return
                try:
                    if heartbeat(self.sessions, self.claim):
                        self.last_beat = time.monotonic()
                    else:
                        self.lost.set()
                except Exception as error:  # a DB hiccup must not kill the job; the next beat retries
                    log.warning("heartbeat of job %d failed: %s", self.claim.job_id, type(error).__name__)

        thread = threading.Thread(target=beat, name=f"heartbeat-{self.claim.job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def _source_instances(sessions: sessionmaker[Session], root: Path, job_id: int) -> list:
    from dicom_node.analysis import SourceInstance
    from worklist.models import Instance, Job

    with sessions() as session:
        study_id = session.scalar(select(Job.study_id).where(Job.id == job_id))
        rows = session.execute(select(Instance).where(Instance.study_id == study_id, Instance.analysable.is_(True))
                               .order_by(Instance.received_at, Instance.id)).scalars().all()
        return [SourceInstance(root / row.path, row.sop_instance_uid, row.laterality, row.view) for row in rows]


@app.task(name=ANALYZE, bind=True)
def analyze_study(self: Task, job_id: int) -> None:
    """Claim the job, analyse its study, record the result and its exports, and hand them to the io queue."""
    from worklist.state import claim_job, complete_job, earlier_done_jobs, fail_job, job_state

    ctx = context()
    settings = ctx.settings
    stale = timedelta(seconds=settings.job_stale_seconds)
    try:
        claim = claim_job(ctx.sessions, job_id, worker_name(), stale)
    except SQLAlchemyError as error:  # the job stays QUEUED: its message must come back, not be acked away
        log.warning("job %d could not be claimed (database error %s): retrying in 5 s", job_id,
                    type(error).__name__)
        raise self.retry(countdown=5, max_retries=None) from None
    if claim is None:
        state = job_state(ctx.sessions, job_id)
        if state is not None and state.value == "RUNNING":  # maybe a dead worker's: look again once it is stale
            raise self.retry(countdown=settings.job_stale_seconds, max_retries=None)
        log.info("job %d is %s: nothing to do for this delivery", job_id, state)
        return
    if claim.attempt > settings.job_max_attempts:  # the earlier attempts never finished: their worker died
        fail_job(ctx.sessions, claim, f"the analysis was started {claim.attempt - 1} times and its worker died or "
                 "stopped each time (a study that crashes the decoder or exhausts the memory?)", retry=False)
        return
    beats = _Heartbeat(ctx.sessions, claim, min(settings.job_stale_seconds, settings.job_time_limit_seconds) / 4,
                       settings.job_stale_seconds, settings.job_time_limit_seconds)
    try:
        with beats.running():
            instances = _source_instances(ctx.sessions, settings.incoming_dir, job_id)
            output = ctx.analyzer.analyse(claim.study_instance_uid, job_id, instances, heartbeat=beats.check,
                                          supersedes=earlier_done_jobs(ctx.sessions, job_id))
    except LeaseLostError as error:  # the job is another attempt's now: this one writes and records nothing
        log.warning("%s: stopped, nothing written", error)
        return
    except PERMANENT_ERRORS as error:
        fail_job(ctx.sessions, claim, f"{type(error).__name__}: {error}", retry=False)
        return
    except Exception as error:
        retry = claim.attempt < settings.job_max_attempts
        log.exception("job %d attempt %d raised", job_id, claim.attempt)
        if fail_job(ctx.sessions, claim, f"{type(error).__name__}: {error}", retry=retry) and retry:
            send_analysis(job_id, countdown=min(10 * 2 ** claim.attempt, MAX_RETRY_COUNTDOWN))
        return
    exports = [(destination.name, obj.sop_instance_uid, str(obj.path))
               for destination in settings.destinations for obj in output.objects]
    done = complete_job(ctx.sessions, claim, output.findings.to_dict(), output.findings.suspicion, output.timings,
                        output.findings.model.model_version, exports,
                        gpu_memory_peak_bytes=output.gpu_memory_peak_bytes)
    if done and exports:
        send_export(job_id)
    if done:  # for the triage page, while the results travel; a job is not failed for want of a picture
        ctx.overlays.draw(job_id, output)


@app.task(name=EXPORT)
def export_results(job_id: int) -> None:
    """Send every due export of a job; failures wait for their backoff (the scheduler re-sends them). Every
    claimed export ends the attempt DELIVERED or failed, whatever goes wrong (``_send_to``)."""
    from worklist.exports import claim_due

    ctx = context()
    attempts = claim_due(ctx.sessions, job_id, hold=timedelta(seconds=EXPORT_HOLD_SECONDS),
                         max_attempts=ctx.settings.export_max_attempts)
    by_destination: dict[str, list[ExportAttempt]] = {}
    for attempt in attempts:
        by_destination.setdefault(attempt.destination, []).append(attempt)
    for name, items in by_destination.items():
        _send_to(ctx, name, items)


def _send_to(ctx: _Context, name: str, items: list[ExportAttempt]) -> None:
    """Send one destination's claimed exports over one association and record each outcome; an error of the
    send fails every attempt not recorded yet (never left PENDING under its claim, nor sent again if stored)."""
    from dicom_node.scu import SendError, send_files
    from worklist.exports import extend_claims, mark_delivered

    settings = ctx.settings
    destination = next((d for d in settings.destinations if d.name == name), None)
    if destination is None:
        _failed(ctx, items, f"destination {name!r} is no longer configured")
        return
    try:
        outcomes = send_files(destination, [Path(a.path) for a in items], settings.ae_title,
                              ssl_context=settings.client_ssl_context(destination),
                              before_each=lambda: extend_claims(ctx.sessions, items,
                                                                timedelta(seconds=EXPORT_HOLD_SECONDS)))
    except SendError as error:
        _failed(ctx, items, str(error))
        return
    except Exception as error:  # unexpected: the send is failed (and retried), not left to the claim's hold
        log.exception("export to %s raised", name)
        _failed(ctx, items, f"{type(error).__name__}: {error}")
        return
    for attempt, outcome in zip(items, outcomes, strict=True):
        if outcome.stored:
            mark_delivered(ctx.sessions, attempt)
            log.info("delivered %s to %s", attempt.sop_instance_uid, name)
        else:
            _failed(ctx, [attempt], f"{name} did not store the object ({outcome.describe()})")


def _failed(ctx: _Context, attempts: list[ExportAttempt], error: str) -> None:
    from worklist.exports import mark_failed_attempt

    for attempt in attempts:
        mark_failed_attempt(ctx.sessions, attempt, error, ctx.settings.export_max_attempts,
                            ctx.settings.export_backoff_seconds)


def send_analysis(job_id: int, countdown: float | None = None) -> str:
    """Put an analysis message on the gpu queue; returns its task id."""
    return analyze_study.apply_async((job_id,), countdown=countdown).id


def send_export(job_id: int) -> str:
    return export_results.apply_async((job_id,)).id
