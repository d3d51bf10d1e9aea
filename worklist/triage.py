"""The triage worklist, ranked in SQL: the reading order of analysed studies, and the studies listed apart.

Sections (each a SQL filter; every study with a mammogram is in exactly one; a study of other modalities
only is never analysed and is not listed):

- ``ranked``: analysed on the four screening views, in the configured order (default: suspicion, highest
  first; ties to the study waiting longest, i.e. whose last instance arrived first; then by row id);
- ``incomplete``: analysed on fewer than four views (scores exist but the study needs a look), same order;
- ``failed``: the analysis failed, longest waiting first;
- ``in_progress``: receiving, or waiting for or in analysis, longest waiting first.

The order is a small declarative config (``Settings.triage_order``): a list of keys from ``ORDER_KEYS``,
``-`` in front for descending. The studies carry no priority flag today; one would be a new key here.
The default order is served by an index (see ``benchmarks/triage_query.py``). No patient names or IDs
unless the caller asks for them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from models.errors import ConfigurationError
from worklist.completeness import SCREENING_VIEW_NAMES, view_name
from worklist.models import Export, Instance, Job, JobState, Result, Study, StudyState

ORDER_KEYS: dict[str, Any] = {
    "suspicion": Study.suspicion,
    "last_received_at": Study.last_received_at,  # waiting time: when the study's last instance arrived
    "first_received_at": Study.first_received_at,
    "study_date": Study.study_date,
}
DEFAULT_ORDER = ("-suspicion", "last_received_at")


class Section(enum.StrEnum):
    RANKED = "ranked"
    INCOMPLETE = "incomplete"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"


SECTION_FILTERS: dict[Section, ColumnElement[bool]] = {
    Section.RANKED: and_(Study.state == StudyState.ANALYSED, Study.views_complete.is_(True)),
    Section.INCOMPLETE: and_(Study.state == StudyState.ANALYSED, Study.views_complete.is_(False)),
    Section.FAILED: Study.state == StudyState.FAILED,
    Section.IN_PROGRESS: and_(Study.state.in_((StudyState.RECEIVING, StudyState.READY)),
                              exists().where(Instance.study_id == Study.id, Instance.analysable.is_(True))),
}
SECTION_OF = case(*((condition, section.value) for section, condition in SECTION_FILTERS.items()))


@dataclass(frozen=True)
class SortKey:
    """One ORDER BY term: a key of ``ORDER_KEYS`` and its direction."""

    key: str
    descending: bool = False

    def clause(self) -> Any:
        column = ORDER_KEYS[self.key]
        return column.desc() if self.descending else column.asc()


def parse_order(spec: Sequence[str]) -> tuple[SortKey, ...]:
    """``["-suspicion", "last_received_at"]`` -> sort keys; unknown keys are a ``ConfigurationError``."""
    keys = tuple(SortKey(item.lstrip("+-"), item.startswith("-")) for item in spec)
    unknown = [key.key for key in keys if key.key not in ORDER_KEYS]
    if unknown or not keys:
        raise ConfigurationError(f"triage_order {list(spec)!r}: use keys among {', '.join(ORDER_KEYS)} "
                                 "(prefix '-' for descending)")
    return keys


DEFAULT_KEYS = parse_order(DEFAULT_ORDER)
WAITING_KEYS = parse_order(("last_received_at",))


@dataclass
class TriageRow:
    """One study as the worklist shows it. ``patient`` is filled only when patient names may be shown."""

    section: str
    rank: int
    study_instance_uid: str
    accession: str | None
    study_date: str | None
    state: str
    suspicion: float | None
    first_received_at: datetime
    last_received_at: datetime
    views: list[str] = field(default_factory=list)
    missing_views: list[str] = field(default_factory=list)
    job_id: int | None = None
    job_state: str | None = None
    error: str | None = None
    result_job_id: int | None = None
    done_at: datetime | None = None
    model_version: str | None = None
    clinical_model: bool | None = None
    breasts: dict[str, dict[str, Any]] = field(default_factory=dict)
    exports: dict[str, int] = field(default_factory=dict)
    patient: dict[str, str | None] | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.patient is None:
            del data["patient"]
        return {key: iso(value) if isinstance(value, datetime) else value for key, value in data.items()}


def as_utc(value: datetime) -> datetime:
    """Aware UTC (SQLite gives back the stored UTC time without a zone, PostgreSQL in the session's zone)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def iso(value: datetime | None) -> str | None:
    return None if value is None else as_utc(value).isoformat()


def section_query(section: Section, order: Sequence[SortKey], limit: int, offset: int = 0) -> Any:
    """The SELECT of one section's study ids, in order, one page."""
    terms = order if section in (Section.RANKED, Section.INCOMPLETE) else WAITING_KEYS
    return (select(Study.id).where(SECTION_FILTERS[section]).order_by(*(key.clause() for key in terms),
                                                                         Study.id).limit(limit).offset(offset))


def ranked_ids(session: Session, section: Section, order: Sequence[SortKey], limit: int,
               offset: int = 0) -> list[int]:
    return list(session.scalars(section_query(section, order, limit, offset)).all())


@dataclass
class TriagePage:
    """One page of every section: ``paged`` from ``offset``, the others from their start."""

    sections: dict[Section, list[TriageRow]]
    more: dict[Section, bool]  # whether the section has studies after its page
    paged: Section
    offset: int

    def rows(self) -> list[TriageRow]:
        return [row for rows in self.sections.values() for row in rows]

    def offset_of(self, section: Section) -> int:
        return self.offset if section == self.paged else 0


def triage(sessions: sessionmaker[Session], order: Sequence[SortKey] = DEFAULT_KEYS, limit: int = 50,
           offset: int = 0, with_patient: bool = False, paged: Section = Section.RANKED) -> TriagePage:
    """Every section, each one page of at most ``limit`` studies; ``offset`` pages the ``paged`` section (a
    row past the page is read to tell whether more follow)."""
    page = TriagePage({}, {}, paged, offset)
    with sessions() as session:
        ids = {section: ranked_ids(session, section, order, limit + 1, page.offset_of(section))
               for section in Section}
        rows = describe(session, [i for found in ids.values() for i in found[:limit]], with_patient)
    for section, found in ids.items():
        page.more[section] = len(found) > limit
        page.sections[section] = [_ranked(rows[i], section, page.offset_of(section) + n)
                                  for n, i in enumerate(found[:limit], start=1)]
    return page


def study(sessions: sessionmaker[Session], study_uid: str, with_patient: bool = False) -> TriageRow | None:
    """One study with its section (rank 0: not placed in the list); None when absent or not on the worklist
    (no mammogram)."""
    with sessions() as session:
        found = session.execute(select(Study.id, SECTION_OF).where(Study.study_instance_uid == study_uid)).first()
        if found is None or found[1] is None:
            return None
        return _ranked(describe(session, [found[0]], with_patient)[found[0]], Section(found[1]), 0)


def _ranked(row: TriageRow, section: Section, rank: int) -> TriageRow:
    row.section, row.rank = section.value, rank
    return row


@dataclass(frozen=True)
class JobSummary:
    id: int
    state: str
    error: str | None
    finished_at: datetime | None
    model_version: str | None


def latest_jobs(session: Session, study_ids: Sequence[int]) -> tuple[dict[int, JobSummary], dict[int, JobSummary]]:
    """Per study: its newest job, and its newest DONE job (whose results are shown)."""
    newest: dict[int, JobSummary] = {}
    done: dict[int, JobSummary] = {}
    for study_id, *columns in session.execute(select(
            Job.study_id, Job.id, Job.state, Job.error, Job.finished_at, Job.model_version).where(
            Job.study_id.in_(study_ids)).order_by(Job.id)):
        job = newest[study_id] = JobSummary(*columns)
        if job.state == JobState.DONE:
            done[study_id] = job
    return newest, done


def describe(session: Session, study_ids: Sequence[int], with_patient: bool = False) -> dict[int, TriageRow]:
    """Rows for the given studies (any order): views, latest job, scores per breast, export counts. The missing
    views of an analysed study are those not received and those its analysis left out (unreadable)."""
    if not study_ids:
        return {}
    views: dict[int, set[str]] = {i: set() for i in study_ids}
    for study_id, laterality, view in session.execute(select(Instance.study_id, Instance.laterality, Instance.view)
                                                      .where(Instance.study_id.in_(study_ids),
                                                             Instance.analysable.is_(True))):
        views[study_id].add(view_name(laterality, view))
    newest, done = latest_jobs(session, study_ids)
    done_ids = [job.id for job in done.values()]
    findings = dict(session.execute(select(Result.job_id, Result.scores).where(Result.job_id.in_(done_ids))).all())
    exports: dict[int, dict[str, int]] = {}
    for job_id, state, count in session.execute(select(Export.job_id, Export.state, func.count()).where(
            Export.job_id.in_(done_ids)).group_by(Export.job_id, Export.state)):
        exports.setdefault(job_id, {})[str(state)] = count
    patient = (Study.patient_name, Study.patient_id) if with_patient else ()
    rows = {}
    for s in session.execute(select(
            Study.id, Study.study_instance_uid, Study.accession_number, Study.study_date, Study.state,
            Study.suspicion, Study.first_received_at, Study.last_received_at, *patient).where(
            Study.id.in_(study_ids))):
        job, result = newest.get(s.id), done.get(s.id)
        scores = findings.get(result.id) if result else None
        left_out = set((scores or {}).get("missing_views", [])) if s.state == StudyState.ANALYSED else set()
        rows[s.id] = TriageRow(
            section="", rank=0, study_instance_uid=s.study_instance_uid, accession=s.accession_number,
            study_date=s.study_date, state=str(s.state), suspicion=s.suspicion,
            first_received_at=s.first_received_at, last_received_at=s.last_received_at,
            views=[name for name in SCREENING_VIEW_NAMES if name in views[s.id]],
            missing_views=[name for name in SCREENING_VIEW_NAMES if name not in views[s.id] or name in left_out],
            job_id=job.id if job else None, job_state=str(job.state) if job else None,
            error=job.error if job else None, result_job_id=result.id if result else None,
            done_at=result.finished_at if result else None, model_version=result.model_version if result else None,
            clinical_model=result_is_clinical(scores), breasts=breast_scores(scores),
            exports=exports.get(result.id, {}) if result else {},
            patient={"name": s.patient_name, "id": s.patient_id} if with_patient else None)
    return rows


def result_is_clinical(findings: dict[str, Any] | None) -> bool | None:
    """Whether every model behind a result is marked for clinical use (results before 2026-11-30 record the
    base model's flag only); None without a result."""
    if findings is None:
        return None
    return findings.get("clinical", findings.get("model", {}).get("clinical"))


def breast_scores(findings: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``{"L": {"malignancy": .., "mass": .., "calcification": .., "density": "B", "birads": "2"}, "R": ..}``
    from a Result's findings JSON (density and BI-RADS: the most probable category)."""
    breasts = {}
    for breast in (findings or {}).get("breasts", []):
        entry: dict[str, Any] = dict(breast.get("scores", {}))
        for name in ("density", "birads"):
            probabilities = breast.get(name) or {}
            entry[name] = max(probabilities, key=probabilities.__getitem__) if probabilities else None
        breasts[breast.get("laterality", "?")] = entry
    return breasts
