"""Read-only views of the worklist: the triage list and the node's counts. No patient names or IDs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from worklist.models import Export, Instance, Job, Study
from worklist.triage import Section, triage


def triage_list(sessions: sessionmaker[Session], limit: int = 50) -> list[dict[str, Any]]:
    """Studies in reading order (``worklist.triage``): the ranked section (highest suspicion first; ties go to
    the study waiting longest), then those analysed on fewer than four views, those in progress, and the failed."""
    sections = triage(sessions, limit=limit).sections
    rows = [row for section in (Section.RANKED, Section.INCOMPLETE, Section.IN_PROGRESS, Section.FAILED)
            for row in sections[section]][:limit]
    return [{"study_instance_uid": row.study_instance_uid, "accession": row.accession, "state": row.state,
             "section": row.section, "suspicion": row.suspicion, "views": row.views,
             "missing_views": row.missing_views, "exports": row.exports, "error": row.error,
             "first_received_at": row.first_received_at, "last_received_at": row.last_received_at} for row in rows]


def node_status(sessions: sessionmaker[Session]) -> dict[str, Any]:
    """How many studies, jobs and exports are in each state, and how many instances are stored."""
    with sessions() as session:
        def counts(column: Any) -> dict[str, int]:
            return {str(state): n for state, n in session.execute(select(column, func.count()).group_by(column))}

        return {"instances": session.scalar(select(func.count()).select_from(Instance)) or 0,
                "studies": counts(Study.state), "jobs": counts(Job.state), "exports": counts(Export.state)}
