"""The triage API and page over real sockets (uvicorn in a thread): ranking, sections, authentication, patient
names, readiness, metrics, thumbnails and overlays. Rows are written with the worklist ORM."""

from __future__ import annotations

import base64
import io
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.settings import Settings
from dicom_node.storage import InstanceStore
from models.errors import ConfigurationError
from tests.conftest import free_port
from tests.test_results import heatmaps_for, write_seg
from tests.worklist_rows import FOUR, PATIENT_ID, PATIENT_NAME, T0, add_study, findings
from worklist.api import ApiServer, serve_api_in_thread
from worklist.api_auth import Authenticator, FailedLoginThrottle
from worklist.db import make_engine, session_factory, upgrade
from worklist.models import ExportState, Job, JobState, Result, Study, StudyState
from worklist.triage import Section, parse_order, triage

TOKEN = "s3cret-token"


def get(url: str, token: str | None = TOKEN, basic: tuple[str, str] | None = None,
        host: str | None = None) -> tuple[int, bytes, Message]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if host:
        headers["Host"] = host
    if basic:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(basic).encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def get_json(url: str, **kwargs: object) -> dict:
    status, body, _ = get(url, **kwargs)
    assert status == 200, body[:500]
    return json.loads(body)


def make_settings(tmp_path: Path, db_url: str, **overrides: object) -> Settings:
    values = {"data_dir": tmp_path / "data", "db_url": db_url, "api_port": free_port(), "api_token": TOKEN,
              "api_min_free_disk_mb": 0, **overrides}
    return Settings(**values)


@pytest.fixture
def sqlite_sessions(tmp_path: Path) -> Iterator[tuple[str, sessionmaker[Session]]]:
    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    engine = make_engine(url)
    upgrade(engine)
    yield url, session_factory(engine)
    engine.dispose()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """``serve(db_url, sessions, **settings) -> ApiServer`` on a free port; stopped after the test."""
    servers: list[ApiServer] = []

    def start(db_url: str, sessions: sessionmaker[Session], **overrides: object) -> ApiServer:
        settings = make_settings(tmp_path, db_url, **overrides)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        servers.append(serve_api_in_thread(settings, sessions))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def uids(rows: list[dict]) -> list[str]:
    return [row["study_instance_uid"] for row in rows]


def test_ranked_by_suspicion_ties_to_the_longest_waiting(db_url, sessions, serve) -> None:
    late_tie = add_study(sessions, 1, StudyState.ANALYSED, 0.5, minutes=30)
    low = add_study(sessions, 2, StudyState.ANALYSED, 0.1, minutes=0)
    high = add_study(sessions, 3, StudyState.ANALYSED, 0.9, minutes=20)
    early_tie = add_study(sessions, 4, StudyState.ANALYSED, 0.5, minutes=10)
    server = serve(db_url, sessions)
    listing = get_json(f"{server.url}/api/studies")
    ranked = listing["sections"]["ranked"]
    assert uids(ranked) == [high, early_tie, late_tie, low]
    assert [row["rank"] for row in ranked] == [1, 2, 3, 4]
    first = ranked[0]
    assert first["breasts"]["L"]["malignancy"] == pytest.approx(0.9) and first["breasts"]["R"]["density"] == "B"
    assert first["model_version"] == "demo@0123456789ab" and first["state"] == "ANALYSED"
    assert first["first_received_at"].startswith("2026-11-01T08:20") and first["done_at"].startswith("2026-11-01")
    assert uids(get_json(f"{server.url}/api/studies?limit=2&offset=2")["sections"]["ranked"]) == [late_tie, low]
    status, page, _ = get(f"{server.url}/")
    html = page.decode()
    assert status == 200 and html.index(high) < html.index(early_tie) < html.index(late_tie) < html.index(low)


def test_the_order_is_a_declarative_config(db_url, sessions) -> None:
    late_high = add_study(sessions, 1, StudyState.ANALYSED, 0.9, minutes=30)
    early_low = add_study(sessions, 2, StudyState.ANALYSED, 0.1, minutes=0)
    by_waiting = triage(sessions, parse_order(["last_received_at", "-suspicion"]))
    assert uids([row.to_json() for row in by_waiting.sections[Section.RANKED]]) == [early_low, late_high]
    with pytest.raises(ConfigurationError, match="priority"):
        parse_order(["-priority"])


def test_failed_and_incomplete_studies_are_listed_apart(db_url, sessions, serve) -> None:
    ranked = add_study(sessions, 1, StudyState.ANALYSED, 0.3)
    three_views = add_study(sessions, 2, StudyState.ANALYSED, 0.99, views=FOUR[:3])
    failed = add_study(sessions, 3, StudyState.FAILED, error="ImageDecodeError: pixel data cut short")
    waiting = add_study(sessions, 4, StudyState.RECEIVING, views=FOUR[:1])
    not_mammography = add_study(sessions, 5, StudyState.RECEIVING, analysable=False)  # never analysed
    server = serve(db_url, sessions)
    sections = get_json(f"{server.url}/api/studies")["sections"]
    assert {name: uids(rows) for name, rows in sections.items()} == {
        "ranked": [ranked], "incomplete": [three_views], "failed": [failed], "in_progress": [waiting]}
    assert sections["incomplete"][0]["missing_views"] == ["RMLO"] and sections["incomplete"][0]["suspicion"] == 0.99
    assert sections["failed"][0]["error"].startswith("ImageDecodeError")
    assert get(f"{server.url}/api/studies/{not_mammography}")[0] == 404


def test_every_section_pages(db_url, sessions, serve) -> None:
    """The sections that need a look page too: a full page says more follow and links to the next, which the
    section parameter reaches; an offset the database could not hold is refused, not a server error."""
    failed = [add_study(sessions, n, StudyState.FAILED, minutes=n, error="boom") for n in range(1, 4)]
    ranked = add_study(sessions, 9, StudyState.ANALYSED, 0.5)
    server = serve(db_url, sessions)
    first = get_json(f"{server.url}/api/studies?limit=2")
    assert uids(first["sections"]["failed"]) == failed[:2] and uids(first["sections"]["ranked"]) == [ranked]
    assert first["more"] == {"ranked": False, "incomplete": False, "failed": True, "in_progress": False}
    rest = get_json(f"{server.url}/api/studies?limit=2&section=failed&offset=2")
    assert uids(rest["sections"]["failed"]) == failed[2:] and not rest["more"]["failed"]
    assert [row["rank"] for row in rest["sections"]["failed"]] == [3]
    assert uids(rest["sections"]["ranked"]) == [ranked]  # the other sections from their start
    html = get(f"{server.url}/?limit=2")[1].decode()
    assert 'href="/?section=failed&amp;offset=2&amp;limit=2#failed"' in html and "analysis failed (2+)" in html
    assert "analysis failed (3-3)" in get(f"{server.url}/?limit=2&section=failed&offset=2")[1].decode()
    for path in ("/api/studies?offset=100000000000000000000", "/?offset=99999999999999999999",
                 "/api/studies?section=nonsense"):
        assert get(f"{server.url}{path}")[0] == 422


def test_a_server_error_is_plain_and_keeps_the_security_headers(sqlite_sessions, serve,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    url, sessions = sqlite_sessions
    server = serve(url, sessions)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("DOE^JANE")

    monkeypatch.setattr("worklist.api.triage", broken)
    status, body, headers = get(f"{server.url}/api/studies")
    assert (status, body) == (500, b"internal error") and "DOE" not in body.decode()
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-store"


def test_a_view_left_out_as_unreadable_is_listed_apart_with_its_reason(db_url, sessions, serve) -> None:
    uid = add_study(sessions, 1, StudyState.ANALYSED, 0.6)
    with sessions.begin() as session:  # the analysis could read no LCC instance
        result = session.scalars(select(Result)).one()
        result.scores = {**result.scores, "missing_views": ["LCC"],
                         "unreadable_views": {"LCC": "SOP Instance UID 1.2.3: pixel data cannot be decoded"}}
        session.execute(update(Study).values(views_complete=False))
    server = serve(db_url, sessions)
    (row,) = get_json(f"{server.url}/api/studies")["sections"]["incomplete"]
    assert (row["study_instance_uid"], row["missing_views"]) == (uid, ["LCC"])
    assert get_json(f"{server.url}/api/studies/{uid}")["unreadable_views"] == {
        "LCC": "SOP Instance UID 1.2.3: pixel data cannot be decoded"}
    assert "its image could not be read: SOP Instance UID 1.2.3: pixel data cannot be decoded" in get(
        f"{server.url}/studies/{uid}")[1].decode()


def test_study_and_its_exports(db_url, sessions, serve) -> None:
    uid = add_study(sessions, 1, StudyState.ANALYSED, 0.7,
                    exports=(ExportState.DELIVERED, ExportState.FAILED, ExportState.PENDING))
    server = serve(db_url, sessions)
    study = get_json(f"{server.url}/api/studies/{uid}")
    assert study["section"] == "ranked" and study["views"]["LCC"]["malignancy"] == pytest.approx(0.7)
    assert study["timings"] == {"preprocess": 0.2, "model": 1.5} and study["jobs"][0]["state"] == "DONE"
    assert study["notes"] and "not" in study["notes"][0].lower()  # the demo model is not clinical
    exports = get_json(f"{server.url}/api/studies/{uid}/exports")["destinations"]
    assert [(d["destination"], d["state"]) for d in exports] == [("pacs", "FAILED")]
    assert [(o["object"], o["state"]) for o in exports[0]["objects"]] == [
        ("SR", "DELIVERED"), ("SEG_LCC", "FAILED"), ("SEG_RCC", "PENDING")]
    assert get(f"{server.url}/api/studies/1.2.3.4")[0] == 404


def test_authentication(sqlite_sessions, serve) -> None:
    url, sessions = sqlite_sessions
    add_study(sessions, 1, StudyState.ANALYSED, 0.5)
    closed = serve(url, sessions, api_token=None)  # no credentials configured: everything refused
    for token in (None, TOKEN, ""):
        status, _, headers = get(f"{closed.url}/api/studies", token=token)
        assert status == 401 and "WWW-Authenticate" in headers
    assert get(f"{closed.url}/", token=None)[0] == 401 and get(f"{closed.url}/metrics", token=None)[0] == 401
    assert get(f"{closed.url}/healthz", token=None)[0] == 200

    server = serve(url, sessions, api_basic_user="reader", api_basic_password="pa:ss")
    assert get(f"{server.url}/api/studies", token="wrong")[0] == 401
    assert get(f"{server.url}/api/studies", token=TOKEN[:-1])[0] == 401
    assert get(f"{server.url}/api/studies", token=TOKEN)[0] == 200
    assert get(f"{server.url}/", token=None, basic=("reader", "pa:ss"))[0] == 200
    status, _, headers = get(f"{server.url}/", token=None, basic=("reader", "wrong"))
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")

    demo = serve(url, sessions, api_token=None, api_allow_local_unauthenticated=True)
    assert get(f"{demo.url}/api/studies", token=None)[0] == 200
    assert get(f"{demo.url}/", token=None)[0] == 200
    # DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 asks from the user's browser
    assert get(f"{demo.url}/api/studies", token=None, host="evil.example:8080")[0] == 401
    assert get(f"{demo.url}/api/studies", token=None, host="localhost")[0] == 200


def test_local_access_is_only_for_loopback_clients_that_name_the_node_so() -> None:
    demo = Authenticator(Settings(api_allow_local_unauthenticated=True))
    local = "localhost:8080"
    assert demo.allowed("", "127.0.0.1", local) and demo.allowed("", "::1", "[::1]:8080")
    assert demo.allowed("", "::ffff:127.0.0.1", "127.0.0.1")
    assert not demo.allowed("", "10.1.2.3", local) and not demo.allowed("", None, local)
    for rebound in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example", "localhost.evil.example:80", ""):
        assert not demo.allowed("", "127.0.0.1", rebound)
    assert not Authenticator(Settings()).allowed("", "127.0.0.1", local)
    assert not Authenticator(Settings(api_token=TOKEN)).allowed(f"Basic {TOKEN}", "10.1.2.3", local)


def test_password_guessing_locks_the_client_out_then_lets_it_back(sqlite_sessions, serve) -> None:
    url, sessions = sqlite_sessions
    server = serve(url, sessions, api_basic_user="reader", api_basic_password="pa:ss", api_max_failed_logins=3)
    studies = f"{server.url}/api/studies"
    assert get(studies, token=None)[0] == 401  # no credentials sent: a browser's first request, not a guess
    for guess in ("a", "b"):
        assert get(studies, token=None, basic=("reader", guess))[0] == 401
    assert get(studies, token=None, basic=("reader", "pa:ss"))[0] == 200  # a success clears the count
    for guess in ("c", "d", "e"):
        assert get(studies, token=None, basic=("reader", guess))[0] == 401
    status, body, headers = get(studies, token=None, basic=("reader", "pa:ss"))
    assert status == 429 and b"try again later" in body and 299 <= int(headers["Retry-After"]) <= 300
    assert get(studies)[0] == 429  # even the right bearer token: the address is locked, not the credential
    assert get(f"{server.url}/healthz", token=None)[0] == 200


def test_a_locked_out_loopback_address_keeps_the_demos_local_access(sqlite_sessions, serve) -> None:
    """A page in the user's browser (DNS rebinding: Host evil.example) sends wrong credentials until 127.0.0.1 is
    locked out: the user's own requests to localhost still get in."""
    url, sessions = sqlite_sessions
    demo = serve(url, sessions, api_token=TOKEN, api_allow_local_unauthenticated=True, api_max_failed_logins=2)
    for _ in range(3):
        assert get(f"{demo.url}/api/studies", token="wrong", host="evil.example:8080")[0] in (401, 429)
    assert get(f"{demo.url}/api/studies", token="wrong", host="evil.example:8080")[0] == 429
    assert get(f"{demo.url}/api/studies", token=None, host="localhost")[0] == 200


def test_failed_login_throttle_forgets_after_its_window_and_stays_bounded() -> None:
    now = [1000.0]
    throttle = FailedLoginThrottle(max_failures=2, window=60, max_clients=3, clock=lambda: now[0])
    assert not throttle.failed("10.0.0.1") and throttle.failed("10.0.0.1")
    assert throttle.locked_for("10.0.0.1") == 60 and throttle.locked_for("10.0.0.2") == 0
    now[0] += 59
    assert throttle.locked_for("10.0.0.1") == pytest.approx(1)
    now[0] += 1
    assert throttle.locked_for("10.0.0.1") == 0 and not throttle.failed("10.0.0.1")  # counting starts over
    for address in ("10.0.0.2", "10.0.0.3", "10.0.0.4"):
        throttle.failed(address)
    assert not throttle.failed("10.0.0.1")  # 10.0.0.1 was the least recent of four: forgotten
    throttle.succeeded("10.0.0.1")
    assert not throttle.failed("10.0.0.1")


def test_no_patient_names_unless_allowed(sqlite_sessions, serve) -> None:
    url, sessions = sqlite_sessions
    uid = add_study(sessions, 1, StudyState.ANALYSED, 0.5, exports=(ExportState.DELIVERED,))
    add_study(sessions, 2, StudyState.FAILED, error="boom")
    paths = ("/", f"/studies/{uid}", "/api/studies", f"/api/studies/{uid}", f"/api/studies/{uid}/exports")
    hidden = serve(url, sessions)
    for path in paths:
        status, body, _ = get(hidden.url + path)
        assert status == 200 and PATIENT_NAME.encode() not in body and PATIENT_ID.encode() not in body, path
    shown = serve(url, sessions, api_show_patient_names=True)
    for path in paths[:4]:
        body = get(shown.url + path)[1]
        assert PATIENT_NAME.encode() in body and PATIENT_ID.encode() in body, path


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_readyz_reports_each_check_and_a_down_broker(db_url, sessions, serve) -> None:
    embedded = serve(db_url, sessions)
    status, body, _ = get(f"{embedded.url}/readyz")
    report = json.loads(body)
    assert status == 200 and report["ready"] is True
    assert set(report["checks"]) == {"database", "broker", "disk", "model"}
    assert report["checks"]["broker"]["ok"] is True and "embedded" in report["checks"]["broker"]["detail"]
    assert report["checks"]["model"]["required"] is False

    down = serve(db_url, sessions, broker_url=f"redis://127.0.0.1:{closed_port()}/0", api_min_free_disk_mb=1e12)
    status, body, _ = get(f"{down.url}/readyz")
    checks = json.loads(body)["checks"]
    assert status == 503 and checks["database"]["ok"] is True
    assert checks["broker"]["ok"] is False and "PING" in checks["broker"]["detail"]
    assert checks["disk"]["ok"] is False


def test_metrics_names_and_values(db_url, sessions, serve) -> None:
    import dicom_node.metrics as scp_metrics

    add_study(sessions, 1, StudyState.ANALYSED, 0.5, exports=(ExportState.DELIVERED, ExportState.DELIVERED))
    add_study(sessions, 2, StudyState.ANALYSED, 0.4, exports=(ExportState.FAILED, ExportState.PENDING))
    add_study(sessions, 3, StudyState.FAILED, error="boom")
    add_study(sessions, 4, StudyState.RECEIVING)
    before = scp_metrics.STORE_REJECTS.labels(scp_metrics.DISK_FULL)._value.get()
    scp_metrics.rejected(scp_metrics.DISK_FULL)
    server = serve(db_url, sessions)
    status, body, headers = get(f"{server.url}/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    expected = {
        'mammo_studies{state="ANALYSED"}': 2, 'mammo_studies{state="FAILED"}': 1,
        'mammo_studies{state="RECEIVING"}': 1, 'mammo_studies{state="READY"}': 0,
        'mammo_jobs{state="DONE"}': 2, 'mammo_jobs{state="FAILED"}': 1, 'mammo_jobs{state="QUEUED"}': 0,
        'mammo_exports{state="DELIVERED"}': 2, 'mammo_exports{state="FAILED"}': 1, 'mammo_exports{state="PENDING"}': 1,
        "mammo_instances": 16, 'mammo_job_stage_seconds_count{stage="model"}': 2,
        'mammo_job_stage_seconds_bucket{le="2.5",stage="model"}': 2,
        'mammo_job_stage_seconds_bucket{le="1.0",stage="model"}': 0,
        'mammo_job_stage_seconds_sum{stage="preprocess"}': 0.4,
        'mammo_model_info{clinical="false",name="demo",source="demo"}': 1,
        'mammo_queue_depth{queue="gpu"}': 0, 'mammo_queue_depth{queue="io"}': 0,
        'mammo_scp_store_rejects_total{reason="disk_full"}': before + 1,
        'mammo_scp_instances_stored_total{analysable="true"}': None,
        'mammo_scp_associations_total{outcome="rejected"}': None,
    }
    for name, value in expected.items():
        assert name in values, name
        assert value is None or values[name] == pytest.approx(value), (name, values[name])
    add_study(sessions, 5, StudyState.ANALYSED, 0.2)  # cumulative: the next scrape adds only the new job
    again = get(f"{server.url}/metrics")[1].decode()
    assert 'mammo_job_stage_seconds_count{stage="model"} 3.0' in again


def test_study_page_shows_the_four_views_and_overlays(synthetic_root, sqlite_sessions, serve, tmp_path) -> None:
    url, sessions = sqlite_sessions
    settings = make_settings(tmp_path, url)
    store = InstanceStore(settings.incoming_dir, sessions)
    files = sorted(next(p for p in sorted(synthetic_root.iterdir()) if p.is_dir()).glob("*.dcm"))
    for path in files:
        dataset = pydicom.dcmread(path)
        store.store([path.read_bytes()], dataset, str(dataset.file_meta.TransferSyntaxUID), "MODALITY")
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with sessions.begin() as session:
        study = session.query(Study).filter_by(study_instance_uid=uid).one()
        study.state, study.suspicion = StudyState.ANALYSED, 0.8
        job = Job(study=study, state=JobState.DONE, model_version="demo@0123456789ab", finished_at=T0)
        session.add_all([job, Result(job=job, scores=findings(uid, 0.8, 0.2), suspicion=0.8)])
        session.flush()
        job_id = job.id
    overlay = settings.results_dir / uid / str(job_id) / "overlay_LCC.png"
    overlay.parent.mkdir(parents=True)
    Image.new("RGB", (16, 24), "red").save(overlay)
    factor_overlay = overlay.with_name("overlay_factor_mass_LCC.png")
    Image.new("RGB", (16, 24), "blue").save(factor_overlay)

    server = serve(url, sessions)
    status, page, _ = get(f"{server.url}/studies/{uid}")
    html = page.decode()
    assert status == 200
    assert all(f"/studies/{uid}/thumbnail_{view}.png" in html for view in ("LCC", "RCC", "LMLO", "RMLO"))
    assert f"/studies/{uid}/overlay_LCC.png" in html and "overlay_RCC.png" not in html
    assert "not a clinical model" in html.lower() or "not clinical" in html.lower()
    status, png, headers = get(f"{server.url}/studies/{uid}/thumbnail_RMLO.png")
    image = Image.open(io.BytesIO(png))
    assert status == 200 and headers["Content-Type"] == "image/png" and image.height <= 256
    assert len(list((settings.data_dir / "cache" / "thumbnails" / uid).glob("*.png"))) == 1  # cached on disk
    assert get(f"{server.url}/studies/{uid}/overlay_LCC.png")[1] == overlay.read_bytes()
    assert get(f"{server.url}/studies/{uid}/overlay_RCC.png")[0] == 404
    # the view's Mammo-FActOR overlays: linked from the page, listed in the JSON, served
    assert f'href="/studies/{uid}/overlay_factor_mass_LCC.png">mass</a>' in html
    assert get(f"{server.url}/studies/{uid}/overlay_factor_mass_LCC.png")[1] == factor_overlay.read_bytes()
    images = json.loads(get(f"{server.url}/api/studies/{uid}")[1])["images"]
    assert images["LCC"]["factor_overlays"] == {"mass": f"/studies/{uid}/overlay_factor_mass_LCC.png"}
    assert images["RCC"] == {"thumbnail": f"/studies/{uid}/thumbnail_RCC.png", "overlay": None,
                             "factor_overlays": {}}
    for missing in ("overlay_factor_dense_LCC.png", "overlay_factor_mass_RCC.png",
                    "overlay_factor_..%2F..%2Fmass_LCC.png", "overlay_factor_mass_LCC_LCC.png"):
        assert get(f"{server.url}/studies/{uid}/{missing}")[0] == 404, missing
    assert get(f"{server.url}/studies/{uid}/thumbnail_XCC.png")[0] == 422
    assert get(f"{server.url}/studies/..%2F..%2Fetc/thumbnail_LCC.png")[0] == 404

    # A worker that stopped between recording the result and drawing the overlays: the page draws the
    # overlay again from the view's SEG and image.
    source = pydicom.dcmread(next(path for path in files if path.name == "R_MLO.dcm"))
    heatmaps = heatmaps_for(source)
    heatmaps["factor calcification"] = np.zeros_like(heatmaps["malignancy"])
    write_seg(source, heatmaps, overlay.with_name("SEG_RMLO.dcm"))
    page = get(f"{server.url}/studies/{uid}")[1].decode()
    assert f"/studies/{uid}/overlay_RMLO.png" in page
    assert f"/studies/{uid}/overlay_factor_calcification_RMLO.png" in page
    status, png, headers = get(f"{server.url}/studies/{uid}/overlay_RMLO.png")
    drawn = Image.open(io.BytesIO(png))
    assert status == 200 and headers["Content-Type"] == "image/png" and drawn.width == source.Columns
    assert overlay.with_name("overlay_RMLO.png").read_bytes() == png  # kept for the next request
    status, png, _ = get(f"{server.url}/studies/{uid}/overlay_factor_calcification_RMLO.png")
    assert status == 200 and overlay.with_name("overlay_factor_calcification_RMLO.png").read_bytes() == png
    assert png != overlay.with_name("overlay_RMLO.png").read_bytes()  # the FActOR map, not the malignancy one
    overlay.with_name("SEG_RCC.dcm").write_bytes(b"not a SEG")
    assert get(f"{server.url}/studies/{uid}/overlay_RCC.png")[0] == 404
    # a redraw that failed is not tried again at each refresh of the page: a while later only
    rcc = pydicom.dcmread(next(path for path in files if path.name == "R_CC.dcm"))
    write_seg(rcc, heatmaps_for(rcc), overlay.with_name("SEG_RCC.dcm"))
    assert get(f"{server.url}/studies/{uid}/overlay_RCC.png")[0] == 404
    assert not overlay.with_name("overlay_RCC.png").exists()


def test_the_port_must_be_free(sqlite_sessions, serve) -> None:
    url, sessions = sqlite_sessions
    first = serve(url, sessions)
    with pytest.raises(OSError, match="could not listen"):
        serve(url, sessions, api_port=first.port)
