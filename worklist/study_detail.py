"""One study in full for the triage API: its worklist row, per-view scores, jobs, and export status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from worklist.completeness import SCREENING_VIEW_NAMES, view_name
from worklist.models import Export, ExportState, Instance, Job, Result, Study
from worklist.triage import TriageRow, iso, study


def study_detail(sessions: sessionmaker[Session], study_uid: str,
                 with_patient: bool = False) -> tuple[TriageRow, dict[str, Any]] | None:
    """The study's row, and ``{"views": {name: scores}, "timings": {...}, "gpu_memory_peak_bytes": int | None,
    "unreadable_views": {name: reason}, "jobs": [...]}`` (timings, GPU memory peak and the views left out as
    unreadable of the shown result's job)."""
    row = study(sessions, study_uid, with_patient)
    if row is None:
        return None
    with sessions() as session:
        jobs = session.execute(select(
            Job.id, Job.state, Job.attempts, Job.model_version, Job.error, Job.created_at, Job.started_at,
            Job.finished_at, Job.timings, Job.gpu_memory_peak_bytes).join(Study).where(
            Study.study_instance_uid == study_uid).order_by(Job.id)).all()
        findings = session.scalar(select(Result.scores).where(Result.job_id == row.result_job_id)) \
            if row.result_job_id else None
    views = {}
    for view in (findings or {}).get("views", []):
        name = view_name(view.get("laterality"), view.get("view"))
        views[name] = {**view.get("scores", {}), "density": _top(view.get("density")),
                       "birads": _top(view.get("birads")), "sop_instance_uid": view.get("sop_instance_uid")}
    shown = next((job for job in jobs if job.id == row.result_job_id), None)
    return row, {"views": {name: views[name] for name in SCREENING_VIEW_NAMES if name in views},
                 "timings": (shown.timings if shown else None) or {},
                 "gpu_memory_peak_bytes": shown.gpu_memory_peak_bytes if shown else None,
                 "model": (findings or {}).get("model"),
                 "unreadable_views": (findings or {}).get("unreadable_views", {}),
                 "jobs": [{"id": job.id, "state": str(job.state), "attempts": job.attempts,
                           "model_version": job.model_version, "error": job.error,
                           "created_at": iso(job.created_at), "started_at": iso(job.started_at),
                           "finished_at": iso(job.finished_at)} for job in jobs]}


def _top(probabilities: dict[str, float] | None) -> str | None:
    return max(probabilities, key=probabilities.__getitem__) if probabilities else None


def export_status(sessions: sessionmaker[Session], job_id: int | None) -> list[dict[str, Any]]:
    """Per destination: the summary state (FAILED if any object failed, else PENDING if any is pending, else
    DELIVERED) and each object (SR, SEG_<view>) of the job's results."""
    if job_id is None:
        return []
    with sessions() as session:
        exports = session.scalars(select(Export).where(Export.job_id == job_id).order_by(
            Export.destination, Export.id)).all()
    destinations: dict[str, list[Export]] = {}
    for export in exports:
        destinations.setdefault(export.destination, []).append(export)
    return [{"destination": name, "job_id": job_id, "state": _summary({e.state for e in items}), "objects": [{
        "object": Path(e.path).stem, "sop_instance_uid": e.sop_instance_uid, "state": str(e.state),
        "attempts": e.attempts, "error": e.error, "last_attempt_at": iso(e.last_attempt_at),
        "next_attempt_at": iso(e.next_attempt_at), "delivered_at": iso(e.delivered_at)} for e in items]}
        for name, items in destinations.items()]


def _summary(states: set[ExportState]) -> str:
    for state in (ExportState.FAILED, ExportState.PENDING, ExportState.SUPERSEDED):
        if state in states:
            return str(state)
    return str(ExportState.DELIVERED)


def view_instance(sessions: sessionmaker[Session], study_uid: str, view: str,
                  preferred_sop: str | None) -> tuple[str, str, str] | None:
    """(SOP Instance UID, path under incoming_dir, content digest) of the study's image for ``view`` (e.g. ``LCC``): the
    analysed one when known, else the latest received."""
    with sessions() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.path, Instance.content_digest,
                                      Instance.laterality, Instance.view).join(Study).where(
            Study.study_instance_uid == study_uid, Instance.analysable.is_(True)).order_by(
            Instance.received_at, Instance.id)).all()
    candidates = [row[:3] for row in rows if view_name(row.laterality, row.view) == view]
    return next((row for row in candidates if row[0] == preferred_sop), candidates[-1] if candidates else None)
