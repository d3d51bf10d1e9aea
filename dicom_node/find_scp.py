"""The Query SCP: C-FIND, Study Root Query/Retrieve Information Model, STUDY level, over the worklist.

A PACS (or ``findscu -S``) asks which studies the node holds, their state and their suspicion score. The keys,
the matching and the statuses are documented in ``docs/cfind.md``. Key values are matched in SQL; patient names
and IDs are returned to the peer when it asks for them, and are never logged (study UIDs and counts are).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, PrivateBlock
from pydicom.multival import ConstrainedList
from pydicom.tag import BaseTag, Tag
from pynetdicom import _config
from pynetdicom.events import Event
from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import InstrumentedAttribute, Session, selectinload, sessionmaker

from dicom_node.study_time import sortable_time
from worklist.models import Instance, Job, JobState, Series, Study, StudyState
from worklist.wildcards import matches, wildcard_matches

log = logging.getLogger(__name__)

# pynetdicom logs whole C-FIND identifiers, which may hold patient names and IDs: never.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

PRIVATE_CREATOR = "MAMMO_CLIP_NODE"
PRIVATE_GROUP = 0x0041
STATE_OFFSET, SUSPICION_OFFSET, MODEL_VERSION_OFFSET = 0x01, 0x02, 0x03

PENDING = 0xFF00
PENDING_KEYS_NOT_SUPPORTED = 0xFF01
CANCELLED = 0xFE00
OUT_OF_RESOURCES = 0xA700
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000

FIND_PAGE = 200  # studies read from the database at a time
RESPONSE_ONLY_TAGS = (Tag("SpecificCharacterSet"), Tag("QueryRetrieveLevel"), Tag("RetrieveAETitle"))
DATE = re.compile(r"[0-9]{8}")  # ASCII digits only: "\d" takes any script's

Condition = ColumnElement[bool]


class QueryError(ValueError):
    """A request the node cannot answer: its failure status and the Error Comment sent with it."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass
class Query:
    """A parsed C-FIND identifier: SQL conditions, the keys to return, and what could not be matched."""

    conditions: list[Condition] = field(default_factory=list)
    requested: list[DataElement] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    private_block: PrivateBlock | None = None


@dataclass(frozen=True)
class StudyMatch:
    """One matching study, read with its page (``FIND_PAGE``) before that page's responses are sent."""

    row_id: int
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    study_date: str | None
    study_time: str | None
    dicom_study_id: str | None
    state: StudyState
    suspicion: float | None
    model_version: str | None
    modalities: list[str]
    series: int
    instances: int

    def key_values(self) -> dict[str, object]:
        """The standard keys this node answers, by keyword."""
        return {"StudyInstanceUID": self.study_instance_uid, "AccessionNumber": self.accession_number,
                "PatientID": self.patient_id, "PatientName": self.patient_name, "StudyDate": self.study_date,
                "StudyTime": self.study_time, "StudyID": self.dicom_study_id,
                "ModalitiesInStudy": self.modalities, "NumberOfStudyRelatedSeries": self.series,
                "NumberOfStudyRelatedInstances": self.instances}


def _values(element: DataElement) -> list[str]:
    """The element's non-empty values as text: list items, sequence items (an empty one is universal), and a
    private key sent in implicit VR, which arrives as bytes."""
    value = element.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace").strip(" \x00").split("\\")
    items = value if isinstance(value, ConstrainedList | list) else [value]
    return [text for text in (str(item).strip() for item in items if item is not None) if text]


def _text(column: InstrumentedAttribute[str | None], values: list[str], ignore_case: bool = False) -> Condition:
    """Single value or wildcard matching on a string column; a list matches any of its values."""
    def one(value: str) -> Condition:
        if not ignore_case and "*" not in value and "?" not in value:
            return column == value
        return matches(column, value, ignore_case)

    return or_(*map(one, values))


def _date(values: list[str]) -> Condition:
    """Single date or range matching (``D``, ``D1-D2``, ``D1-``, ``-D2``) on StudyDate."""
    def one(value: str) -> Condition:
        start, dash, end = value.partition("-")
        if not (start or end) or not all(DATE.fullmatch(date) for date in (start, end) if date):
            raise QueryError(UNABLE_TO_PROCESS, "StudyDate must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
        if not dash:
            return Study.study_date == start
        return and_(*([Study.study_date >= start] if start else []), *([Study.study_date <= end] if end else []))

    return or_(*map(one, values))


def _time(values: list[str]) -> Condition:
    """Single time or range matching (``T``, ``T1-T2``, ``T1-``, ``-T2``) on StudyTime; a partial time takes in
    its whole hour or minute (``08`` matches 08:00:00 to 08:59:59.999999)."""
    def one(value: str) -> Condition:
        start, dash, end = value.partition("-")
        if not dash:
            end = start
        bounds = (sortable_time(start) if start else None, sortable_time(end, latest=True) if end else None)
        if not (start or end) or (start and bounds[0] is None) or (end and bounds[1] is None):
            raise QueryError(UNABLE_TO_PROCESS, "StudyTime must be HHMMSS[.FFFFFF] (or HH, HHMM) or a range of them")
        return and_(*([Study.study_time >= bounds[0]] if start else []),
                    *([Study.study_time <= bounds[1]] if end else []))

    return or_(*map(one, values))


def _state(values: list[str]) -> Condition:
    """Matching on the private study state: the wildcards are resolved against the known states."""
    return Study.state.in_([state for state in StudyState
                            if any(wildcard_matches(value, state.value) for value in values)])


MATCHERS: dict[str, Callable[[list[str]], Condition]] = {
    "StudyInstanceUID": Study.study_instance_uid.in_,
    "AccessionNumber": lambda values: _text(Study.accession_number, values),
    "PatientID": lambda values: _text(Study.patient_id, values),
    "PatientName": lambda values: _text(Study.patient_name, values, ignore_case=True),
    "StudyDate": _date,
    "StudyTime": _time,
    "StudyID": lambda values: _text(Study.dicom_study_id, values),
    "ModalitiesInStudy": lambda values: Study.series.any(_text(Series.modality, values)),
}


def _private_block(identifier: Dataset) -> PrivateBlock | None:
    """The block the requester reserved for ``MAMMO_CLIP_NODE`` in group 0041, if it asked for one."""
    try:
        return identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return None


def _in_block(tag: BaseTag, block: PrivateBlock | None) -> bool:
    """Whether ``tag`` is one of the data elements of our private block (not its creator)."""
    return block is not None and tag.group == PRIVATE_GROUP and tag.element >> 8 == block.block_start >> 8


def _matcher(element: DataElement, block: PrivateBlock | None) -> Callable[[list[str]], Condition] | None:
    """How a key is matched, or None when the node cannot match on it."""
    if _in_block(element.tag, block):
        return _state if element.tag == block.get_tag(STATE_OFFSET) else None
    return MATCHERS.get(element.keyword)


def parse_query(identifier: Dataset) -> Query:
    """Turn a request identifier into SQL conditions; ``QueryError`` for a level other than STUDY or a bad key.
    Private keys of other creators are not returned; one with a value to match is listed as not supported."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip()
    if level != "STUDY":
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                         f"only STUDY level is supported, not {level[:16]!r}")
    block = _private_block(identifier)
    skipped = {*RESPONSE_ONLY_TAGS, *([Tag(PRIVATE_GROUP, block.block_start >> 8)] if block else [])}
    query = Query(private_block=block)
    for element in identifier:
        ours = _in_block(element.tag, block)
        foreign = element.tag.is_private and not ours  # another vendor's private key: never returned (an empty
        if element.tag in skipped or (foreign and element.tag.is_private_creator):  # creator would orphan its
            continue  # block), matched on by nobody
        if not (ours or foreign):
            query.requested.append(element)
        values = _values(element)
        if not values or any(set(value) == {"*"} for value in values):
            continue  # universal matching
        matcher = None if foreign else _matcher(element, block)
        if matcher is None:
            query.unsupported.append(element.keyword or str(element.tag))
        else:
            query.conditions.append(matcher(values))
    return query


def find_studies(sessions: sessionmaker[Session], conditions: list[Condition], after: int = 0,
                 limit: int | None = None) -> list[StudyMatch]:
    """The studies meeting every condition, with their counts, modalities and the model of their last score, in
    row order: those after row ``after``, at most ``limit``."""
    instances = select(func.count(Instance.id)).where(Instance.study_id == Study.id).scalar_subquery()
    model_version = select(Job.model_version).where(Job.study_id == Study.id, Job.state == JobState.DONE).order_by(
        Job.id.desc()).limit(1).scalar_subquery()
    with sessions() as session:
        rows = session.execute(select(Study, instances, model_version).where(*conditions, Study.id > after).options(
            selectinload(Study.series)).order_by(Study.id).limit(limit)).all()
        return [StudyMatch(study.id, study.study_instance_uid, study.accession_number, study.patient_id,
                           study.patient_name, study.study_date, study.study_time, study.dicom_study_id, study.state,
                           study.suspicion, version,
                           sorted({s.modality for s in study.series if s.modality}), len(study.series), count)
                for study, count, version in rows]


def _pages(sessions: sessionmaker[Session], conditions: list[Condition]) -> Iterator[list[StudyMatch]]:
    """``find_studies`` a page at a time: a query that matches the whole archive is never held in memory at once,
    and a C-CANCEL stops it between pages."""
    after = 0
    while page := find_studies(sessions, conditions, after, FIND_PAGE):
        yield page
        after = page[-1].row_id


def _element(tag: BaseTag, vr: str, value: object) -> DataElement:
    # values come from the worklist as received: sent as they are, never validated (a warning would print them)
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


def build_response(query: Query, match: StudyMatch, ae_title: str) -> Dataset:
    """The identifier of one Pending response: the requested keys, the level, our AE and the private block."""
    response = Dataset()
    response.QueryRetrieveLevel = "STUDY"
    response.RetrieveAETitle = ae_title
    known = match.key_values()
    for element in query.requested:
        response.add(_element(element.tag, element.VR, known.get(element.keyword)))
    block = query.private_block
    if block is not None:
        suspicion = None if match.suspicion is None else f"{match.suspicion:.4f}"
        response.add(_element(Tag(PRIVATE_GROUP, block.block_start >> 8), "LO", PRIVATE_CREATOR))
        response.add(_element(block.get_tag(STATE_OFFSET), "CS", match.state.value))
        response.add(_element(block.get_tag(SUSPICION_OFFSET), "DS", suspicion))
        response.add(_element(block.get_tag(MODEL_VERSION_OFFSET), "LO", match.model_version))
    if not all(str(element.value).isascii() for element in response if element.VR in ("PN", "LO", "SH")):
        response.SpecificCharacterSet = "ISO_IR 192"
    return response


def _failure(status: int, comment: str) -> Dataset:
    dataset = Dataset()
    dataset.Status = status
    dataset.ErrorComment = comment[:64]
    return dataset


def handle_find(event: Event, sessions: sessionmaker[Session],
                ae_title: str) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND handler: one Pending response per matching study, or one failure status."""
    calling = event.assoc.requestor.ae_title
    try:
        query = parse_query(event.identifier)
    except QueryError as error:
        log.warning("C-FIND from %s refused: %s", calling, error.comment)
        yield _failure(error.status, error.comment), None
        return
    status = PENDING_KEYS_NOT_SUPPORTED if query.unsupported else PENDING
    sent = 0
    try:
        for page in _pages(sessions, query.conditions):
            for match in page:
                if event.is_cancelled:
                    log.info("C-FIND from %s cancelled after %d studies", calling, sent)
                    yield CANCELLED, None
                    return
                log.debug("C-FIND match for %s: study %s", calling, match.study_instance_uid)
                yield status, build_response(query, match, ae_title)
                sent += 1
    except SQLAlchemyError as error:
        log.error("C-FIND from %s failed: database error %s", calling, type(error).__name__)
        yield OUT_OF_RESOURCES, None
        return
    log.info("C-FIND from %s: %d studies matched (keys %s%s)", calling, sent,
             ", ".join(element.keyword or str(element.tag) for element in query.requested) or "none",
             f"; not matched on {', '.join(query.unsupported)}" if query.unsupported else "")
