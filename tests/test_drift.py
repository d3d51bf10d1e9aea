"""The model drift watch (``worklist.drift``): PSI, weekly histograms in SQL on SQLite and PostgreSQL, the
reference week, the scheduler's once-per-week alert, the API routes, banner and gauge, and the CLI."""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import random
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.cli import main
from dicom_node.scheduler import Scheduler
from dicom_node.settings import Settings
from tests.test_api import get, get_json, make_settings
from tests.worklist_rows import PATIENT_ID, PATIENT_NAME
from worklist.api import serve_api_in_thread
from worklist.db import make_engine, session_factory
from worklist.drift import EPSILON, DriftWatch, drift_report, psi
from worklist.models import Job, JobState, Result, Study, StudyState

V1, V2 = "site-v1@0123456789ab", "site-v2@ba9876543210"
MONDAY = datetime(2025, 1, 6, tzinfo=UTC)  # ISO week 2025-W02
LATER = date(2025, 6, 1)  # every week below has ended
NUMBERS = itertools.count(1)


def week(n: int) -> datetime:
    return MONDAY + timedelta(weeks=n)


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions whose PostgreSQL connections run in UTC+14, so week boundaries must be taken in UTC."""
    engine = (make_engine(db_url) if db_url.startswith("sqlite") else
              create_engine(db_url, connect_args={"options": "-c timezone=Pacific/Kiritimati"}))
    yield session_factory(engine)
    engine.dispose()


def add_results(sessions: sessionmaker[Session], version: str, start: datetime, scores: list[float],
                span: timedelta = timedelta(days=7)) -> list[str]:
    """One analysed study (with patient data), DONE job and result per score, created evenly over ``span``."""
    uids = []
    with sessions.begin() as session:
        for n, score in enumerate(scores):
            number = next(NUMBERS)
            at = start + span * (n + 0.5) / len(scores)
            uids.append(f"1.2.826.0.1.3680043.10.777.{number}")
            study = Study(study_instance_uid=uids[-1], accession_number=f"ACC{number}", patient_name=PATIENT_NAME,
                          patient_id=PATIENT_ID, state=StudyState.ANALYSED, suspicion=score, first_received_at=at,
                          last_received_at=at)
            job = Job(study=study, state=JobState.DONE, model_version=version, created_at=at, finished_at=at)
            session.add_all([study, job, Result(job=job, scores={}, suspicion=score, created_at=at)])
    return uids


def beta(seed: int, n: int, a: float = 2.0, b: float = 5.0) -> list[float]:
    rng = random.Random(seed)
    return [rng.betavariate(a, b) for _ in range(n)]


def drifting_version(sessions: sessionmaker[Session], version: str = V1, offset: int = 0) -> None:
    """Weeks ``offset`` + 0..4: partial first week (from Wednesday), reference, too few, stable, shifted."""
    add_results(sessions, version, week(offset) + timedelta(days=2), beta(1, 250), timedelta(days=5))
    add_results(sessions, version, week(offset + 1), beta(2, 300))
    add_results(sessions, version, week(offset + 2), beta(3, 10))
    add_results(sessions, version, week(offset + 3), beta(4, 300))
    add_results(sessions, version, week(offset + 4), beta(5, 300, 5.0, 2.0))


def test_psi_matches_a_hand_computed_example() -> None:
    reference = [10] * 10  # 10% in each bin
    actual = [20, 20, 10, 10, 10, 10, 10, 5, 5, 0]  # proportions .2 .2 .1 x5 .05 .05 0 (floored at EPSILON)
    by_hand = 2 * (0.2 - 0.1) * math.log(2) + 2 * (0.05 - 0.1) * math.log(0.5) + (EPSILON - 0.1) * math.log(1e-3)
    assert by_hand == pytest.approx(0.898029, abs=1e-6)
    assert psi(actual, reference) == pytest.approx(by_hand, rel=1e-12)
    assert psi(reference, reference) == 0.0


def test_stable_weeks_stay_below_the_threshold_and_a_shift_crosses_it(db_url, sessions) -> None:
    drifting_version(sessions)
    report = drift_report(sessions, Settings(), LATER)
    assert report.threshold == 0.2 and report.min_studies == 200 and report.in_service == V1
    (version,) = report.versions
    first, reference, few, stable, shifted = version.weeks
    assert [w.week for w in version.weeks] == ["2025-W02", "2025-W03", "2025-W04", "2025-W05", "2025-W06"]
    assert version.reference == reference  # the first week is partial: the version came in on a Wednesday
    assert [w.n for w in version.weeks] == [250, 300, 10, 300, 300]
    assert reference.psi == 0.0 and few.psi is None  # fewer than drift_min_studies: not compared
    assert first.psi < 0.2 and stable.psi < 0.2 < shifted.psi
    assert version.latest == shifted and report.shifted() == [shifted]
    assert stable.mean == pytest.approx(sum(beta(4, 300)) / 300) and shifted.mean > 0.6
    assert "2025-W06" in report.alert() and V1 in report.alert()


def test_weeks_are_iso_weeks_in_utc(db_url, sessions) -> None:
    sunday_night, monday_morning = week(0) - timedelta(minutes=30), week(0) + timedelta(minutes=30)
    add_results(sessions, V1, sunday_night, [0.05], timedelta(0))
    add_results(sessions, V1, monday_morning, [0.95, 1.0], timedelta(0))
    (version,) = drift_report(sessions, Settings(), LATER).versions
    assert [(w.week, w.counts) for w in version.weeks] == [("2025-W01", (1, *[0] * 9)), ("2025-W02", (*[0] * 9, 2))]


def test_the_reference_is_a_full_week_with_enough_results(db_url, sessions) -> None:
    add_results(sessions, V1, week(0), beta(1, 100))
    add_results(sessions, V1, week(1), beta(2, 20))
    add_results(sessions, V1, week(2), beta(3, 100))
    settings = Settings(drift_min_studies=50)
    last_day = week(3).date() - timedelta(days=1)  # Sunday of 2025-W04: the week has not ended
    (version,) = drift_report(sessions, settings, last_day).versions  # 2025-W02: its first week, W03: too few
    assert version.reference is None and all(w.psi is None for w in version.weeks)
    (version,) = drift_report(sessions, settings, week(3).date()).versions
    assert version.reference.week == "2025-W04" and version.weeks[0].psi is not None and version.weeks[1].psi is None


def test_the_alert_is_logged_once_per_version_and_week_without_patient_data(db_url, sessions, caplog) -> None:
    drifting_version(sessions, V1)
    uids = (add_results(sessions, V2, week(10) + timedelta(days=6), beta(6, 5), timedelta(days=1))
            + add_results(sessions, V2, week(11), beta(7, 40)) + add_results(sessions, V2, week(12), beta(8, 40, 5, 2)))
    settings = Settings(drift_check_seconds=600, drift_min_studies=30)  # V2 has 40 a week
    scheduler = Scheduler(settings, sessions, lambda job: "task", lambda job: "task")
    with caplog.at_level(logging.WARNING, logger="worklist.drift"):
        scheduler.tick()
        scheduler.tick()  # not due again
        scheduler.drift.check(sessions, 1e9)  # due, but nothing new
    lines = [record.getMessage() for record in caplog.records if record.name == "worklist.drift"]
    assert len(lines) == 2 and lines[0].startswith(f"score drift: model {V1} week 2025-W06: PSI ")
    assert lines[1].startswith(f"score drift: model {V2} week 2025-W14: PSI ") and lines[1].endswith("(n 40)")
    for private in (PATIENT_NAME, PATIENT_ID, "ACC", *uids):
        assert private not in "\n".join(lines)
    watch = DriftWatch(settings)
    assert watch.due(0.0) and watch.check(sessions, 0.0) and not watch.due(599.0) and watch.due(600.0)


def test_drift_page_api_plot_banner_and_metrics(db_url, sessions, tmp_path) -> None:
    drifting_version(sessions, V1)
    with serve_api_in_thread(make_settings(tmp_path, db_url), sessions) as server:
        for path in ("/drift", "/api/drift", "/drift.png"):
            assert get(server.url + path, token=None)[0] == 401
            assert get(server.url + path, token="wrong")[0] == 401
        report = get_json(f"{server.url}/api/drift")
        assert report["in_service"] == V1 and report["bins"] == 10 and "2025-W06" in report["alert"]
        (version,) = report["versions"]
        assert version["reference_week"] == "2025-W03" and version["latest_week"] == "2025-W06"
        assert [w["n"] for w in version["weeks"]] == [250, 300, 10, 300, 300] and version["weeks"][2]["psi"] is None
        status, page, _ = get(f"{server.url}/drift")
        html = page.decode()
        assert status == 200 and html.count('<tr class="error">') == 1 and "2025-W03 (reference)" in html
        assert 'id="drift-alert"' in html and '<img src="/drift.png"' in html
        status, png, headers = get(f"{server.url}/drift.png")
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(png)).size[0] <= 600 and len(png) < 100_000
        status, page, _ = get(f"{server.url}/")
        assert status == 200 and 'id="drift-alert"' in page.decode() and "2025-W06" in page.decode()
        metrics = get(f"{server.url}/metrics")[1].decode()
        assert f'mammo_suspicion_psi{{model_version="{V1}",week="2025-W06"}}' in metrics
        for private in (PATIENT_NAME, PATIENT_ID):
            assert all(private.encode() not in get(server.url + path)[1] for path in ("/drift", "/api/drift"))

    add_results(sessions, V2, week(10) + timedelta(days=3), beta(11, 100), timedelta(days=4))  # now in service
    add_results(sessions, V2, week(11), beta(12, 300))
    add_results(sessions, V2, week(12), beta(13, 300))  # stable
    with serve_api_in_thread(make_settings(tmp_path, db_url), sessions) as server:
        assert get_json(f"{server.url}/api/drift")["alert"] is None
        assert 'id="drift-alert"' not in get(f"{server.url}/")[1].decode()
        assert 'id="drift-alert"' not in get(f"{server.url}/drift")[1].decode()


def test_an_empty_worklist(db_url, sessions, tmp_path) -> None:
    with serve_api_in_thread(make_settings(tmp_path, db_url), sessions) as server:
        assert get_json(f"{server.url}/api/drift") == {"threshold": 0.2, "min_studies": 200, "bins": 10,
                                                        "in_service": None, "alert": None, "versions": []}
        assert "no results yet" in get(f"{server.url}/drift")[1].decode()
        status, png, _ = get(f"{server.url}/drift.png")
        assert status == 200 and png.startswith(b"\x89PNG")


def test_the_drift_command(db_url, sessions, tmp_path) -> None:
    drifting_version(sessions, V1)
    runner = CliRunner(env={"MAMMO_DB_URL": db_url, "MAMMO_DATA_DIR": str(tmp_path / "data")})
    result = runner.invoke(main, ["drift", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["versions"][0]["reference_week"] == "2025-W03"
    table = runner.invoke(main, ["drift"]).stdout.splitlines()
    assert table[0].split() == ["model", "version", "week", "results", "mean", "PSI"]
    assert table[2].split()[:3] == [V1, "2025-W03", "300"] and table[2].endswith("reference")
    assert table[3].split()[-1] == "-" and table[5].endswith("DRIFT") and "Score drift" in table[-1]
