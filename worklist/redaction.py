"""Patient identifiers taken out of error texts before they are stored, shown or logged.

A job's or an export's error is the message of whatever failed, and libraries quote the values they fail on: a
Patient's Name, a Patient ID, an Accession Number. The worklist's pages, its JSON and the CLI show errors
whatever ``api_show_patient_names`` says, and the state changes log them, so the identifiers of the error's own
study are replaced before the text is recorded (``redacted``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from worklist.models import Export, Job, Study

REDACTED = "[redacted]"
MIN_PART_LENGTH = 3  # name parts shorter than this ("A", "Jo") would blank ordinary words; whole values always go
NAME_SEPARATORS = re.compile(r"[\^=\s,]+")  # PN components and groups, and the spaces and commas of free text


def redact(text: str, identifiers: Iterable[str | None]) -> str:
    """``text`` with every identifier, and every part of a Person Name of at least ``MIN_PART_LENGTH``
    characters, replaced by ``REDACTED`` (case-insensitive; longest first, so a whole name goes before its
    parts)."""
    values = {value.strip() for value in identifiers if value and value.strip()}
    parts = {part for value in values for part in NAME_SEPARATORS.split(value) if len(part) >= MIN_PART_LENGTH}
    targets = sorted(values | parts, key=len, reverse=True)
    if not targets:
        return text
    return re.sub("|".join(map(re.escape, targets)), REDACTED, text, flags=re.IGNORECASE)


def study_identifiers(session: Session, *, job_id: int | None = None, export_id: int | None = None) -> list[str]:
    """The Patient's Name, Patient ID and Accession Number of the study of a job or of an export."""
    query = select(Study.patient_name, Study.patient_id, Study.accession_number).join(Job, Job.study_id == Study.id)
    if export_id is not None:
        query = query.join(Export, Export.job_id == Job.id).where(Export.id == export_id)
    else:
        query = query.where(Job.id == job_id)
    row = session.execute(query).first()
    return [value for value in row if value] if row else []


def redacted(session: Session, text: str, *, job_id: int | None = None, export_id: int | None = None) -> str:
    """``text`` without the identifiers of its job's or export's study (see ``redact``)."""
    return redact(text, study_identifiers(session, job_id=job_id, export_id=export_id))
