"""The analysis task's delivery guarantees that need no model: a job the database cannot claim is retried, and
its overlay PNGs do not hold up the worker's next task."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

import worklist.state
from dicom_node import tasks
from dicom_node.settings import Settings
from dicom_node.tasks import OverlayDrawer
from worklist.db import make_engine, upgrade


def test_a_job_that_cannot_be_claimed_is_retried_not_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(data_dir=tmp_path)
    engine = make_engine(settings.database_url())
    upgrade(engine)
    engine.dispose()
    tasks.configure(settings)
    calls = []

    def database_down_once(*args: object) -> None:
        calls.append(args[1])
        if len(calls) == 1:
            raise OperationalError("UPDATE job", {}, ConnectionError("server closed the connection"))
        return None  # back: the job is someone else's or finished, nothing to do

    monkeypatch.setattr(worklist.state, "claim_job", database_down_once)
    result = tasks.analyze_study.apply(args=(42,))  # eager: the retry runs again at once
    assert calls == [42, 42] and result.successful()


class _SlowOverlays:
    """An analysis output whose overlays take until ``release`` is set (or fail)."""

    def __init__(self, release: threading.Event, drawn: list[str], name: str, fail: bool = False) -> None:
        self.release, self.drawn, self.name, self.fail = release, drawn, name, fail

    def draw_overlays(self) -> list[Path]:
        assert self.release.wait(30)
        if self.fail:
            raise OSError(28, "No space left on device")
        self.drawn.append(self.name)
        return []


def test_overlays_are_drawn_after_the_task_one_job_at_a_time(caplog: pytest.LogCaptureFixture) -> None:
    """The task returns (the worker takes the job's export) while its overlays are drawn; the next job's
    overlays wait for the previous ones; a failure is logged, not raised."""
    drawer = OverlayDrawer()
    first_done, second_done, drawn = threading.Event(), threading.Event(), []
    first = drawer.draw(1, _SlowOverlays(first_done, drawn, "first", fail=True))
    assert not first.done()  # handed over: draw() did not wait for the drawing
    handing_over = threading.Thread(target=drawer.draw, args=(2, _SlowOverlays(second_done, drawn, "second")))
    handing_over.start()
    handing_over.join(0.3)
    assert handing_over.is_alive()  # the second job waits for the first job's overlays
    with caplog.at_level(logging.WARNING, logger="dicom_node.tasks"):
        first_done.set()
        handing_over.join(30)
        first.result(30)
    assert "job 1: overlay PNGs not drawn: OSError" in caplog.text
    second_done.set()
    third = threading.Event()
    third.set()
    drawer.draw(3, _SlowOverlays(third, drawn, "third")).result(30)  # handed over once the second's are drawn
    assert drawn == ["second", "third"]


def test_a_job_whose_worker_died_at_every_attempt_fails_instead_of_coming_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A study that kills its worker (a decoder crash, the memory exhausted) never reaches fail_job: released
    again and again, it would take the worker down forever. Past job_max_attempts it is FAILED with the reason."""
    from sqlalchemy import update

    from tests.test_worklist_state import ready_job
    from worklist.db import session_factory
    from worklist.models import Job, JobState, Study, StudyState

    settings = Settings(data_dir=tmp_path, job_max_attempts=3)
    engine = make_engine(settings.database_url())
    upgrade(engine)
    sessions = session_factory(engine)
    job_id = ready_job(sessions, "1.2.3.77")
    with sessions.begin() as session:  # three claims, each ended by the worker's death (released as QUEUED)
        session.execute(update(Job).values(state=JobState.QUEUED, attempts=3))
    tasks.configure(settings)
    monkeypatch.setattr(tasks._Context, "analyzer", property(lambda self: pytest.fail("analysed a fourth time")))
    assert tasks.analyze_study.apply(args=(job_id,)).successful()
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.attempts) == (JobState.FAILED, 4) and "worker died" in job.error
        assert session.get(Study, job.study_id).state == StudyState.FAILED
    engine.dispose()


@pytest.mark.parametrize("how", ["claimed by another worker", "heartbeats failing"])
def test_an_attempt_that_lost_its_lease_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       how: str) -> None:
    """Another worker that claimed the job writes the same files under the same UIDs: an attempt whose lease
    was taken (or whose heartbeats failed long enough for that) stops at the next check, before writing."""
    import time

    from sqlalchemy import update

    from tests.test_worklist_state import ready_job
    from worklist.db import session_factory
    from worklist.models import Job, JobState

    settings = Settings(data_dir=tmp_path, job_stale_seconds=1.0)
    engine = make_engine(settings.database_url())
    upgrade(engine)
    sessions = session_factory(engine)
    job_id = ready_job(sessions, "1.2.3.78")
    if how == "heartbeats failing":
        def database_down(*args: object) -> bool:
            raise OperationalError("UPDATE job", {}, ConnectionError("server closed the connection"))

        monkeypatch.setattr(worklist.state, "heartbeat", database_down)
    checks: list[str] = []

    class Analyzer:
        def analyse(self, study_uid: str, job: int, instances: list, heartbeat: Callable[[], object],
                    supersedes: list[int]) -> None:
            if how == "claimed by another worker":
                with sessions.begin() as session:
                    session.execute(update(Job).values(lease="other-worker"))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                checks.append("checked")
                heartbeat()  # raises once the lease is known lost
                time.sleep(0.05)
            pytest.fail("the attempt went on to write its results")

    tasks.configure(settings)
    monkeypatch.setattr(tasks._Context, "analyzer", property(lambda self: Analyzer()))
    assert tasks.analyze_study.apply(args=(job_id,)).successful()
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.state == JobState.RUNNING and job.finished_at is None  # nothing recorded by this attempt
    assert len(checks) > 1
    engine.dispose()


def test_an_analysis_past_its_time_limit_is_taken_as_hung(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Celery time limit works in a solo or thread pool: past job_time_limit_seconds the heartbeat thread
    stops beating and ends the process (here: records it), whose supervisor starts another; the job, stale,
    is retried until job_max_attempts."""
    from types import SimpleNamespace

    monkeypatch.setattr(worklist.state, "heartbeat", lambda sessions, claim: True)
    hung = threading.Event()
    beats = tasks._Heartbeat(None, SimpleNamespace(job_id=5, attempt=1), interval=0.05, stale=60, limit=0.3,
                             on_hung=hung.set)
    with beats.running():
        assert hung.wait(10)
    assert Settings().job_time_limit_seconds == 1800


def test_redis_keeps_a_retry_invisible_for_longer_than_its_countdown() -> None:
    """A worker holds a retried analysis unacked until its countdown (up to MAX_RETRY_COUNTDOWN) ends; Redis must
    not hand the message to another worker before then."""
    before = tasks._Context.current
    try:
        app = tasks.configure(Settings(broker_url="redis://127.0.0.1:6379/13", job_stale_seconds=6))
        assert app.conf.broker_transport_options["visibility_timeout"] >= tasks.MAX_RETRY_COUNTDOWN + 6
        app = tasks.configure(Settings(broker_url="redis://127.0.0.1:6379/13", job_stale_seconds=600))
        assert app.conf.broker_transport_options["visibility_timeout"] == 1800
    finally:
        if before is not None:
            tasks.configure(before.settings)
