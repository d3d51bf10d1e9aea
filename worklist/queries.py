"""Read-only views of the worklist: the triage list and the node's counts. No patient names or IDs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from worklist.completeness import SCREENING_VIEW_NAMES, view_name
from worklist.models import Export, Instance, Job, Study, StudyState

# Analysed studies first (by suspicion), then those still in progress, then failed ones, listed apart.
_STATE_ORDER = case((Study.state == StudyState.ANALYSED, 0), (Study.state == StudyState.FAILED, 2), else_=1)


def triage_list(sessions: sessionmaker[Session], limit: int = 50) -> list[dict[str, Any]]:
    """Studies in reading order: highest suspicion first; ties go to the study waiting longest."""
    with sessions() as session:
        studies = session.scalars(select(Study).order_by(
            _STATE_ORDER, Study.suspicion.desc().nulls_last(), Study.last_received_at).limit(limit)).all()
        ids = [study.id for study in studies]
        views: dict[int, set[str]] = {i: set() for i in ids}
        for study_id, laterality, view in session.execute(select(
                Instance.study_id, Instance.laterality, Instance.view).where(
                Instance.study_id.in_(ids), Instance.analysable.is_(True))).all():
            views[study_id].add(view_name(laterality, view))
        exports: dict[int, dict[str, int]] = {i: {} for i in ids}
        for study_id, state, count in session.execute(select(Job.study_id, Export.state, func.count()).join(
                Job, Export.job_id == Job.id).where(Job.study_id.in_(ids)).group_by(Job.study_id, Export.state)):
            exports[study_id][str(state)] = count
        last_job = dict(session.execute(select(Job.study_id, func.max(Job.id)).where(
            Job.study_id.in_(ids)).group_by(Job.study_id)).all())
        errors = dict(session.execute(select(Job.id, Job.error).where(Job.id.in_(last_job.values()))).all())
        return [{
            "study_instance_uid": study.study_instance_uid,
            "accession": study.accession_number,
            "state": str(study.state),
            "suspicion": study.suspicion,
            "views": [name for name in SCREENING_VIEW_NAMES if name in views[study.id]],
            "missing_views": [name for name in SCREENING_VIEW_NAMES if name not in views[study.id]],
            "exports": exports[study.id],
            "error": errors.get(last_job.get(study.id)),
            "first_received_at": study.first_received_at,
            "last_received_at": study.last_received_at,
        } for study in studies]


def node_status(sessions: sessionmaker[Session]) -> dict[str, Any]:
    """How many studies, jobs and exports are in each state, and how many instances are stored."""
    with sessions() as session:
        def counts(column: Any) -> dict[str, int]:
            return {str(state): n for state, n in session.execute(select(column, func.count()).group_by(column))}

        return {"instances": session.scalar(select(func.count()).select_from(Instance)) or 0,
                "studies": counts(Study.state), "jobs": counts(Job.state), "exports": counts(Export.state)}
