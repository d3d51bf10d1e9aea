"""The triage web page and read-only HTTP API (FastAPI), served by uvicorn in a thread of the node process.

    GET /                                  the triage list (HTML, auto-refresh)
    GET /studies/{uid}                     a study: four views with heatmap overlays, scores, exports (HTML)
    GET /studies/{uid}/thumbnail_{view}.png, /studies/{uid}/overlay_{view}.png   (view: LCC, RCC, LMLO, RMLO)
    GET /studies/{uid}/overlay_factor_{attribute}_{view}.png   a Mammo-FActOR map's overlay (attribute: mass...)
    GET /api/studies[?limit=&offset=]      the triage list by section (JSON)
    GET /api/studies/{uid}                 a study (JSON); /api/studies/{uid}/exports: export status
    GET /drift, /api/drift, /drift.png     suspicion-score drift per model version and week (worklist.drift)
    GET /healthz                           liveness (no authentication)
    GET /readyz                            database, broker, disk (and model files), 503 when not ready
    GET /metrics                           Prometheus text

Every route but /healthz needs credentials (``worklist.api_auth``). Patient names and IDs appear only with
``api_show_patient_names``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.results.io import overlay_file, overlay_name, seg_file
from dicom_node.results.seg import FACTOR_PREFIX
from dicom_node.serving import NOT_CLINICAL_BANNER
from dicom_node.settings import Settings
from worklist import api_pages
from worklist.api_auth import Authenticator
from worklist.api_metrics import worklist_registry
from worklist.drift import CachedReport, plot_png
from worklist.node_checks import as_json, readiness, served_model
from worklist.overlays import factor_attributes, malignancy_overlay
from worklist.study_detail import export_status, study_detail, view_instance
from worklist.thumbnails import cached_thumbnail
from worklist.triage import Section, TriageRow, parse_order, triage

log = logging.getLogger(__name__)

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "X-Frame-Options": "DENY",
                    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"}


MAX_OFFSET = 2**31 - 1  # a larger offset is refused (422) before the database, which would overflow on it
REDRAW_RETRY_SECONDS = 300.0  # an overlay that could not be drawn again is not tried again for this long
NOT_CLINICAL_CARD = "The card of the model in service says it is not a clinical model: its scores are not clinical."
NOT_CLINICAL_RESULTS = "Some scores shown come from a model not marked for clinical use: they are not clinical."


class View(enum.StrEnum):
    LCC = "LCC"
    RCC = "RCC"
    LMLO = "LMLO"
    RMLO = "RMLO"


def no_overlay(view: str, attribute: str | None) -> HTTPException:
    """The 404 of an overlay PNG the study's result does not offer or that could not be drawn."""
    return HTTPException(404, f"no {view} {attribute or 'malignancy'} overlay")


def create_app(settings: Settings, sessions: sessionmaker[Session]) -> FastAPI:
    """The app over the node's worklist sessions (nothing is written to the database)."""
    order = parse_order(settings.triage_order)
    show_patient = settings.api_show_patient_names
    drift = CachedReport(sessions, settings)
    registry = worklist_registry(settings, sessions, drift)
    thumbnails = Path(settings.data_dir) / "cache" / "thumbnails"
    app = FastAPI(title="Mammo-CLIP Node triage", docs_url=None, redoc_url=None, openapi_url=None)
    router = APIRouter(dependencies=[Depends(Authenticator(settings))])

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        try:
            response = await call_next(request)
        except Exception as error:  # answered here, so that an error's page has the headers too; no message
            log.error("%s %s failed: %s", request.method, request.url.path, type(error).__name__)
            response = PlainTextResponse("internal error", status_code=500)
        response.headers.update(SECURITY_HEADERS)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    def notes(rows: list[TriageRow]) -> list[str]:
        """The not-clinical warning when the card of the model in service says so (its intended use, e.g.
        trained on synthetic data), or when a shown result's model was not marked for clinical use."""
        model = served_model(settings, sessions)
        if model.clinical is False:
            text = NOT_CLINICAL_BANNER if model.source == "demo" else model.card.get("intended_use")
            return [" ".join(str(text or NOT_CLINICAL_CARD).split())]  # a card's value may be any JSON
        return [NOT_CLINICAL_RESULTS] if any(row.clinical_model is False for row in rows) else []

    def found(study_uid: str) -> tuple[TriageRow, dict[str, Any]]:
        detail = study_detail(sessions, study_uid, show_patient)
        if detail is None:
            raise HTTPException(404, "no such study on the worklist")
        return detail

    def result_folder(row: TriageRow) -> Path | None:
        if row.result_job_id is None:
            return None
        return settings.results_dir / row.study_instance_uid / str(row.result_job_id)

    def overlays(row: TriageRow) -> dict[str, list[str]]:
        """The views with a malignancy overlay in the study's result (drawn, or to be drawn again from its SEG
        when asked for), each with the attributes of its FActOR overlays."""
        folder = result_folder(row)
        if folder is None:
            return {}
        return {view.value: factor_attributes(folder, view.value) for view in View
                if malignancy_overlay(folder, view.value) is not None}

    def overlay_url(row: TriageRow, view: str, attribute: str | None = None) -> str:
        return f"/studies/{row.study_instance_uid}/{overlay_name(view, attribute)}"

    def served_overlay(study_uid: str, view: str, attribute: str | None) -> FileResponse:
        """The overlay PNG of the view's malignancy map, or of its FActOR map of ``attribute``; drawn again from
        the view's SEG and image when the worker did not draw it."""
        row, detail = found(study_uid)
        folder = result_folder(row)  # only this view's SEG is read to see what it offers
        if folder is None or malignancy_overlay(folder, view) is None or (
                attribute is not None and attribute not in factor_attributes(folder, view)):
            raise no_overlay(view, attribute)
        path = overlay_file(folder, view, attribute)
        with redrawing:  # one redraw at a time: two requests for a missing PNG do not both decode its image
            if not path.is_file():
                redraw(path, folder, row, detail, view, attribute)
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    redrawing = threading.Lock()
    failed_redraws: dict[Path, float] = {}  # overlay -> when it last could not be drawn again

    def redraw(path: Path, folder: Path, row: TriageRow, detail: dict[str, Any], view: str,
               attribute: str | None) -> None:
        """Draw a missing overlay PNG again from the view's SEG and image; 404 when that fails, and for
        ``REDRAW_RETRY_SECONDS`` after without trying again (a page refresh does not decode the image again)."""
        now = time.monotonic()
        for stale in [key for key, when in failed_redraws.items() if now - when > REDRAW_RETRY_SECONDS]:
            del failed_redraws[stale]
        if path in failed_redraws:
            raise no_overlay(view, attribute)
        from dicom_node.results.overlay import factor_title, malignancy_title, redraw_overlay  # torch: lazily

        scores = detail["views"].get(view, {})
        chosen = view_instance(sessions, row.study_instance_uid, view, scores.get("sop_instance_uid"))
        try:
            title = (malignancy_title(view, float(scores["malignancy"])) if attribute is None
                     else factor_title(view, attribute))
            redraw_overlay(seg_file(folder, view), settings.incoming_dir / chosen[1], path, title,
                           "malignancy" if attribute is None else FACTOR_PREFIX + attribute)
        except Exception as error:  # a missing or unreadable SEG or image must not take the page down
            failed_redraws[path] = now
            log.warning("overlay %s of study %s not drawn again: %s", path.name, row.study_instance_uid,
                        type(error).__name__)
            raise no_overlay(view, attribute) from None
        log.info("overlay %s of study %s drawn again from its SEG", path.name, row.study_instance_uid)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    def readyz() -> JSONResponse:
        report = as_json(readiness(settings, sessions))
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    @router.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY) + generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/api/studies")
    def studies(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=MAX_OFFSET),
                section: Section = Section.RANKED) -> dict[str, Any]:
        page = triage(sessions, order, limit, offset, show_patient, section)
        return {"order": settings.triage_order, "limit": limit, "offset": offset, "section": section.value,
                "notes": notes(page.rows()),
                "more": {name.value: more for name, more in page.more.items()},
                "sections": {name.value: [row.to_json() for row in rows] for name, rows in page.sections.items()}}

    @router.get("/api/studies/{study_uid}")
    def study(study_uid: str) -> dict[str, Any]:
        row, detail = found(study_uid)
        offered = overlays(row)
        return {**row.to_json(), **detail, "notes": notes([row]),
                "images": {view: {"thumbnail": f"/studies/{row.study_instance_uid}/thumbnail_{view}.png"
                                  if view in row.views else None,
                                  "overlay": overlay_url(row, view) if view in offered else None,
                                  "factor_overlays": {attribute: overlay_url(row, view, attribute)
                                                      for attribute in offered.get(view, [])}}
                           for view in View}}

    @router.get("/api/studies/{study_uid}/exports")
    def exports(study_uid: str) -> dict[str, Any]:
        row, _ = found(study_uid)
        return {"study_instance_uid": row.study_instance_uid,
                "destinations": export_status(sessions, row.result_job_id)}

    @router.get("/api/drift")
    def drift_json() -> dict[str, Any]:
        return drift().to_json()

    @router.get("/studies/{study_uid}/thumbnail_{view}.png")
    def thumbnail(study_uid: str, view: View) -> FileResponse:
        row, detail = found(study_uid)
        chosen = view_instance(sessions, row.study_instance_uid, view.value,
                               detail["views"].get(view.value, {}).get("sop_instance_uid"))
        if chosen is None:
            raise HTTPException(404, f"no {view.value} image")
        sop_uid, path, digest = chosen
        try:
            png = cached_thumbnail(thumbnails / row.study_instance_uid, settings.incoming_dir / path, sop_uid, digest)
        except Exception as error:  # an undecodable image must not take the page down
            log.warning("no thumbnail for instance %s: %s", sop_uid, type(error).__name__)
            raise HTTPException(404, "the image cannot be rendered") from None
        return FileResponse(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    # before overlay_{view}.png, whose pattern also matches these paths
    @router.get("/studies/{study_uid}/overlay_factor_{attribute}_{view}.png")
    def factor_overlay_png(study_uid: str, attribute: str, view: View) -> FileResponse:
        return served_overlay(study_uid, view.value, attribute)

    @router.get("/studies/{study_uid}/overlay_{view}.png")
    def overlay_png(study_uid: str, view: View) -> FileResponse:
        return served_overlay(study_uid, view.value, None)

    @router.get("/", response_class=HTMLResponse)
    def index(offset: int = Query(0, ge=0, le=MAX_OFFSET), limit: int = Query(50, ge=1, le=500),
              section: Section = Section.RANKED) -> str:
        page = triage(sessions, order, limit, offset, show_patient, section)
        return api_pages.list_page(page, notes(page.rows()), settings.api_refresh_seconds, settings.triage_order,
                                   show_patient, limit, drift().alert())

    @router.get("/studies/{study_uid}", response_class=HTMLResponse)
    def study_page(study_uid: str) -> str:
        row, detail = found(study_uid)
        return api_pages.study_page(row, detail, export_status(sessions, row.result_job_id), overlays(row),
                                    notes([row]), settings.api_refresh_seconds)

    @router.get("/drift", response_class=HTMLResponse)
    def drift_page() -> str:
        return api_pages.drift_page(drift(), notes([]), settings.api_refresh_seconds)

    @router.get("/drift.png")
    def drift_png() -> Response:
        return Response(plot_png(drift()), media_type="image/png")

    app.include_router(router)
    return app


class ApiServer:
    """A uvicorn server running the app in a background thread."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.server.config.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_api_in_thread(settings: Settings, sessions: sessionmaker[Session], timeout: float = 10.0) -> ApiServer:
    """Start the API on ``api_bind_host:api_port``; ``OSError`` when it cannot listen there."""
    import uvicorn

    config = uvicorn.Config(create_app(settings, sessions), host=settings.api_bind_host, port=settings.api_port,
                            log_config=None, access_log=False, proxy_headers=False, lifespan="off",
                            server_header=False)
    server = uvicorn.Server(config)

    def run() -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot listen; reported below
            server.run()

    thread = threading.Thread(target=run, name="triage-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        thread.join(timeout)
        raise OSError(f"the triage API could not listen on {settings.api_bind_host}:{settings.api_port}")
    handle = ApiServer(server, thread)
    log.info("triage page and API on %s/", handle.url)
    return handle
