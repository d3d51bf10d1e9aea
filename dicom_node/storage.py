"""Received instances: validated UIDs -> safe paths, atomic fsynced files, and their worklist rows.

The order is what makes "nothing lost" true: the file is written and fsynced under a temporary name; in one
transaction its UIDs are checked and its rows written, the file is renamed into place, and the rows are committed;
then its folder is fsynced, and only then does the Storage SCP answer Success. Instances that concurrent
associations store at the same moment share that transaction (``worklist.writers.GroupCommit``: one turn, one
commit), each in a savepoint of its own, so that an instance refused for its UIDs or its file does not take back the
others (a database error fails them all: each sender resends). The folder's fsync comes after the commit so that the
next writer does not wait for it (under load it took 5 ms, a quarter of a writer's turn). A crash between the two
can leave a committed row whose rename did not reach the disk (ext4 and XFS make it durable with SQLite's commit; a
PostgreSQL commit does not): the sender had no Success and sends the instance again. A resend of the same SOP
Instance UID rewrites the same path and updates the same row, so it is idempotent; a resend of the same bytes
changes no row (an analysed study is not analysed again for it) but its file is still written again and its folder
fsynced before Success, whatever a crash left there; a changed instance re-opens its study.

A SOP Instance UID is filed under one study, series and patient only. An instance whose UIDs clash with what is
stored (its SOP Instance UID already in another study or series, its series in another study, or its study
stored under another Patient ID) is refused with ``UIDConflictError``, so that no patient's image is ever analysed
in another patient's study; the first instance stays as it was. The check runs inside the transaction, before the
stored file is touched: on SQLite that transaction holds the database's write lock from its start (BEGIN
IMMEDIATE), so no other SCP process files anything between the check and the commit, and the SCP's writers queue
for it (``worklist.writers``) rather than sleep on SQLite's busy handler. On PostgreSQL the rows are inserted with
``ON CONFLICT DO NOTHING``, and a study, series or instance row that another transaction inserted meanwhile is
checked again before it is used (the same instance from another association at the same moment is updated).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import blake3
from pydicom.dataset import Dataset
from sqlalchemy import Select, Table, bindparam, case, literal, literal_column, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.durable_files import FileData, data_views, fsync_folder, place, stage_file
from dicom_node.study_time import sortable_time
from dicom_node.validation import MalformedInstanceError, check_instance
from models.errors import NodeError
from models.sop_classes import ANALYSABLE_SOP_CLASSES, view_of
from worklist.models import Instance, Series, Study, StudyState, utcnow
from worklist.writers import GroupCommit, WriterQueue

log = logging.getLogger(__name__)

# PS3.5 §9.1: components of digits without leading zeros (except "0"), dot-separated, at most 64 characters.
UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_HASHING = ThreadPoolExecutor(max_workers=4, thread_name_prefix="digest")  # an instance's digest beside its write
DIGEST_ALGORITHM = "blake3"
HASH_CHUNK = 1 << 20  # bytes read at a time when a stored file is hashed


class InvalidUIDError(NodeError, ValueError):
    """A UID that breaks the DICOM UID grammar (and so can never name a file)."""


class UIDConflictError(InvalidUIDError):
    """An instance whose UIDs clash with stored ones (the same SOP Instance UID in another study, series or
    patient): refused, the stored instance is kept."""


def validated_uid(value: object, name: str) -> str:
    """The UID if it is a valid DICOM UID, else ``InvalidUIDError`` (it may be hostile: ``../../etc``)."""
    uid = str(value or "")
    if len(uid) > 64 or not UID_PATTERN.fullmatch(uid):
        raise InvalidUIDError(f"{name} {uid[:80]!r} is not a valid DICOM UID")
    return uid


def instance_path(root: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """``root/studies/<study>/<series>/<sop>.dcm`` from validated UIDs; never outside ``root``."""
    parts = [validated_uid(study_uid, "StudyInstanceUID"), validated_uid(series_uid, "SeriesInstanceUID"),
             validated_uid(sop_uid, "SOPInstanceUID") + ".dcm"]
    return Path(root, "studies", *parts)


def content_digest(parts: Iterable[bytes], algorithm: str = DIGEST_ALGORITHM) -> str:
    """``algorithm:hex`` of the parts' concatenation (an instance's DICOM file). New rows use BLAKE3: 1.1 ms per
    6.8 MB image on this project's VMs against SHA-256's 4.2 ms (with the CPU's SHA instructions), and under
    load SHA-256 was a quarter of the Storage SCP's CPU. ``sha256`` digests are those of rows stored before
    migration 0010; both release the interpreter lock."""
    digest = blake3.blake3() if algorithm == "blake3" else hashlib.new(algorithm)
    for part in parts:
        digest.update(part)
    return f"{algorithm}:{digest.hexdigest()}"


def file_digest(path: Path, algorithm: str = DIGEST_ALGORITHM) -> str:
    """``content_digest`` of a stored file."""
    with path.open("rb") as handle:
        return content_digest(iter(lambda: handle.read(HASH_CHUNK), b""), algorithm)


@dataclass(frozen=True)
class StoredInstance:
    """What the store did with one instance."""

    sop_instance_uid: str
    study_instance_uid: str
    path: Path
    analysable: bool
    duplicate: bool


class _FiledStudy(NamedTuple):
    id: int
    patient_id: str | None


class _FiledSeries(NamedTuple):
    id: int
    study_instance_uid: str  # the study it is filed under


class _FiledInstance(NamedTuple):
    id: int
    content_digest: str
    study_instance_uid: str  # the study and series it is filed under
    series_instance_uid: str


@dataclass(frozen=True)
class _Filed:
    """What the database holds under an instance's three UIDs (None where nothing is)."""

    study: _FiledStudy | None
    series: _FiledSeries | None
    instance: _FiledInstance | None

    def conflict(self, study_uid: str, series_uid: str, sop_uid: str, patient_id: str | None) -> str | None:
        """Why an instance of these UIDs clashes with the stored ones, or None. Names UIDs only, never a patient."""
        if self.study is not None and self.study.patient_id and patient_id and self.study.patient_id != patient_id:
            return f"study {study_uid} is already stored under another Patient ID"
        if self.series is not None and self.series.study_instance_uid != study_uid:
            return f"series {series_uid} is already stored in study {self.series.study_instance_uid}"
        if self.instance is not None and (self.instance.study_instance_uid,
                                          self.instance.series_instance_uid) != (study_uid, series_uid):
            return (f"SOP Instance UID {sop_uid} is already stored in study {self.instance.study_instance_uid}, "
                    f"series {self.instance.series_instance_uid}")
        return None


_STUDY, _SERIES, _INSTANCE = Study.__table__, Series.__table__, Instance.__table__


def _filed_by_uids() -> Select:
    """The study, series and instance rows of three UIDs in one statement and one row (NULLs where none is): each
    statement on the C-STORE path is a release and a wait for the interpreter lock, under load ~0.5 ms each."""
    study, series, series_study = _STUDY.alias(), _SERIES.alias(), _STUDY.alias()
    instance, instance_study, instance_series = _INSTANCE.alias(), _STUDY.alias(), _SERIES.alias()
    anchor = select(literal_column("1").label("one")).subquery()
    return select(
        study.c.id, study.c.patient_id, series.c.id, series_study.c.study_instance_uid,
        instance.c.id, instance.c.content_digest, instance_study.c.study_instance_uid,
        instance_series.c.series_instance_uid,
    ).select_from(
        anchor.outerjoin(study, study.c.study_instance_uid == bindparam("study_uid"))
        .outerjoin(series, series.c.series_instance_uid == bindparam("series_uid"))
        .outerjoin(series_study, series_study.c.id == series.c.study_id)
        .outerjoin(instance, instance.c.sop_instance_uid == bindparam("sop_uid"))
        .outerjoin(instance_study, instance_study.c.id == instance.c.study_id)
        .outerjoin(instance_series, instance_series.c.id == instance.c.series_id))


# Built once: on the C-STORE path statements are executed on the session's connection, not built and run by the
# ORM for each instance (that was a third of the store's CPU).
_FILED_BY_UIDS = _filed_by_uids()
_INSERT_IF_ABSENT = {  # by dialect: the worklist database is SQLite or PostgreSQL
    (name, table): dialect_insert(table).on_conflict_do_nothing(index_elements=[key]).returning(table.c.id)
    for name, dialect_insert in (("sqlite", sqlite.insert), ("postgresql", postgresql.insert))
    for table, key in ((_STUDY, "study_instance_uid"), (_SERIES, "series_instance_uid"),
                       (_INSTANCE, "sop_instance_uid"))}
_UPDATE_INSTANCE = update(_INSTANCE).where(_INSTANCE.c.id == bindparam("row_id"))
_TOUCH_STUDY = update(_STUDY).where(_STUDY.c.id == bindparam("row_id")).values(last_received_at=bindparam("now"))
# A new or changed analysable instance: one more revision for its study (``worklist.state`` then knows that a job
# promoted before did not see it) and an analysed or failed study re-opened. Decided in the statement, on the row
# it locks, not on the state read before: a worker settling the study at the same moment is ordered with it.
_REVISE_STUDY = _TOUCH_STUDY.values(revision=_STUDY.c.revision + 1, state=case(
    (_STUDY.c.state.in_([StudyState.ANALYSED, StudyState.FAILED]), literal(StudyState.RECEIVING, _STUDY.c.state.type)),
    else_=_STUDY.c.state))


def _filed(session: Session, study_uid: str, series_uid: str, sop_uid: str) -> _Filed:
    """Three lookups by unique key, in one statement."""
    row = session.connection().execute(
        _FILED_BY_UIDS, {"study_uid": study_uid, "series_uid": series_uid, "sop_uid": sop_uid}).one()
    return _Filed(_FiledStudy(*row[0:2]) if row[0] is not None else None,
                  _FiledSeries(*row[2:4]) if row[2] is not None else None,
                  _FiledInstance(*row[4:8]) if row[4] is not None else None)


def _insert_once(session: Session, table: Table, key: str, value: str, **fields: object) -> tuple[int, bool]:
    """The id of the row keyed ``key == value``, and whether another transaction inserted it meanwhile (the
    insert is one statement, ``ON CONFLICT DO NOTHING``: PostgreSQL waits for that transaction's outcome, and its
    row is then selected)."""
    connection = session.connection()
    inserted = connection.execute(_INSERT_IF_ABSENT[connection.dialect.name, table], {key: value, **fields}).scalar()
    if inserted is not None:
        return inserted, False
    return connection.execute(select(table.c.id).where(table.c[key] == value)).scalar_one(), True


def _write_rows(session: Session, dataset: Dataset, uids: tuple[str, str, str], patient_id: str | None,
                fields: dict[str, object], filed: _Filed, now: object) -> None:
    """Insert or update the instance's rows (a new study and series first), checking the UIDs of rows that
    another transaction inserted meanwhile (another SCP process on PostgreSQL) before they are used."""
    study_uid, series_uid, sop_uid = uids
    study_id, study_meanwhile = (filed.study.id, False) if filed.study is not None else _insert_once(
        session, _STUDY, "study_instance_uid", study_uid,
        accession_number=str(dataset.get("AccessionNumber") or "")[:16] or None, patient_id=patient_id,
        patient_name=str(dataset.get("PatientName") or "")[:324] or None,
        study_date=str(dataset.get("StudyDate") or "")[:8] or None, study_time=sortable_time(dataset.get("StudyTime")),
        dicom_study_id=str(dataset.get("StudyID") or "")[:16] or None)
    series_id, series_meanwhile = (filed.series.id, False) if filed.series is not None else _insert_once(
        session, _SERIES, "series_instance_uid", series_uid, study_id=study_id,
        modality=str(dataset.get("Modality") or "")[:16] or None)
    row = {"study_id": study_id, "series_id": series_id, "received_at": now, **fields}
    instance_id, instance_meanwhile = (filed.instance.id, False) if filed.instance is not None else _insert_once(
        session, _INSTANCE, "sop_instance_uid", sop_uid, **row)
    if study_meanwhile or series_meanwhile or instance_meanwhile:
        reason = _filed(session, study_uid, series_uid, sop_uid).conflict(study_uid, series_uid, sop_uid, patient_id)
        if reason is not None:
            raise _uid_conflict(reason)
    connection = session.connection()
    if filed.instance is not None or instance_meanwhile:  # a resend, or the same instance from another
        connection.execute(_UPDATE_INSTANCE, {"row_id": instance_id, **row})  # association at the same moment
    connection.execute(_REVISE_STUDY if fields["analysable"] else _TOUCH_STUDY, {"row_id": study_id, "now": now})


def _begin_writing(session: Session) -> None:
    """On SQLite, take the database's write lock now (BEGIN IMMEDIATE): the lookups and the inserts see one state,
    no other process writes between them, and a savepoint cannot commit on its own (pysqlite begins transactions
    lazily, so without this the first SAVEPOINT would open, and its RELEASE commit, a transaction of its own).
    PostgreSQL's transactions need nothing."""
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # as it is: nothing to compile


def _uid_conflict(reason: str) -> UIDConflictError:
    return UIDConflictError(f"{reason}; refused so that no image is filed under two studies or patients")


@dataclass(frozen=True)
class _Record:
    """One received instance for ``_record``: its dataset and UIDs, its rows' fields, its staged file and path."""

    dataset: Dataset
    uids: tuple[str, str, str]
    patient_id: str | None
    fields: dict[str, object]
    staged: Path
    path: Path


def _record(session: Session, record: _Record, savepoint: bool) -> bool:
    """Check the instance's UIDs, write its rows and rename its staged file into place (in a ``savepoint`` when
    other instances share the transaction); True for a resend of a stored SOP Instance UID."""
    study_uid, series_uid, sop_uid = record.uids
    filed = _filed(session, study_uid, series_uid, sop_uid)
    reason = filed.conflict(study_uid, series_uid, sop_uid, record.patient_id)
    if reason is not None:
        raise _uid_conflict(reason)
    # The same bytes again (a sender resending after a lost response or a failed association): nothing new to
    # analyse, so no row changes and the study is not re-opened (that would send a second SR and SEGs). The staged
    # copy still replaces the file, which a crash may have left missing or older than the row, and its folder is
    # fsynced before Success: Success is never answered for a file that is not on disk.
    if filed.instance is not None and _same_content(_current_digest(session, filed.instance), record):
        place(record.staged, record.path)
    else:
        with session.begin_nested() if savepoint else nullcontext():  # a failed rename takes back its rows
            _write_rows(session, record.dataset, record.uids, record.patient_id, record.fields, filed, utcnow())
            place(record.staged, record.path)
    return filed.instance is not None


def _current_digest(session: Session, instance: _FiledInstance) -> str:
    """The stored instance's digest; on PostgreSQL re-read under its row lock, so that another SCP process
    changing this instance at the same moment is waited for and its change seen (a resend judged against the
    digest read before that commit would rename the old bytes over the new file and leave its row saying new).
    SQLite's writers are one at a time (BEGIN IMMEDIATE): what ``_filed`` read is current."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        return instance.content_digest
    return connection.execute(select(_INSTANCE.c.content_digest).where(_INSTANCE.c.id == instance.id)
                              .with_for_update()).scalar_one()


def _same_content(stored_digest: str, record: _Record) -> bool:
    """Whether a stored row's digest is that of the received instance; a row stored before migration 0010 has a
    SHA-256 one, for which the staged file is hashed again (only for such a row's resend, in the writers' turn).
    A digest of no known algorithm (emptied by a downgrade, say) is never the same."""
    algorithm = stored_digest.partition(":")[0]
    if algorithm == DIGEST_ALGORITHM:
        return stored_digest == record.fields["content_digest"]
    return algorithm == "sha256" and stored_digest == file_digest(record.staged, algorithm)


class InstanceStore:
    """Files under ``root`` and rows in the worklist database, written together."""

    def __init__(self, root: Path, sessions: sessionmaker[Session]) -> None:
        self.root = Path(root)
        self.sessions = sessions
        self.writers = WriterQueue.for_engine(sessions.kw["bind"])  # SQLite: one writer at a time, queued
        # concurrent stores share one transaction and its commit, in one turn (``worklist.writers.GroupCommit``)
        self.batches: GroupCommit[_Record, bool] = GroupCommit(self._write_batch, self.writers.turn)

    def store(self, encoded: FileData, dataset: Dataset, transfer_syntax_uid: str,
              calling_ae: str) -> StoredInstance:
        """Write one received instance and commit its rows. ``encoded`` is its DICOM file: as parts (preamble and
        file meta, then the dataset as received) or as the ``AlignedImage`` it was received into; the caller has
        checked its element structure, e.g. with ``decode_received``. Raises on any failure (nothing is
        claimed): ``InvalidUIDError`` (``UIDConflictError``) and ``MalformedInstanceError`` for a dataset that
        must not be stored (any error reading its values is one), the stored file untouched; anything else is
        the node's own failure. Only a failed commit after the rename leaves the new file
        without its row, which the resend the sender is asked for (0xA700) records."""
        study_uid = validated_uid(dataset.get("StudyInstanceUID"), "StudyInstanceUID")
        series_uid = validated_uid(dataset.get("SeriesInstanceUID"), "SeriesInstanceUID")
        sop_uid = validated_uid(dataset.get("SOPInstanceUID"), "SOPInstanceUID")
        sop_class = validated_uid(dataset.get("SOPClassUID"), "SOPClassUID")
        try:
            check_instance(dataset, transfer_syntax_uid)
            patient_id = str(dataset.get("PatientID") or "")[:64] or None
            analysable = sop_class in ANALYSABLE_SOP_CLASSES and dataset.get("Modality") == "MG"
            laterality, view = view_of(dataset)
        except (MalformedInstanceError, MemoryError):
            raise
        except Exception as error:  # reading the sender's values can raise anything: the dataset's fault
            raise MalformedInstanceError(f"its attributes cannot be read ({type(error).__name__})") from error
        path = instance_path(self.root, study_uid, series_uid, sop_uid)
        fields = {
            "sop_class_uid": sop_class, "transfer_syntax_uid": transfer_syntax_uid,
            "laterality": laterality[:2] or None, "view": view[:16] or None, "analysable": analysable,
            "path": str(path.relative_to(self.root)), "size_bytes": sum(map(len, data_views(encoded))),
            "calling_ae": calling_ae[:16],
        }
        # hashed while the file is written and fsynced (both free the GIL)
        digest = _HASHING.submit(content_digest, data_views(encoded))
        try:
            staged = stage_file(path, encoded)
        finally:
            fields["content_digest"] = digest.result()
        try:
            existing = self.batches.submit(_Record(dataset, (study_uid, series_uid, sop_uid), patient_id, fields,
                                                    staged, path))
        finally:
            staged.unlink(missing_ok=True)  # published, or refused: nothing of it stays but the published file
        fsync_folder(path.parent)  # after the commit, outside the writers' turn (see the module docstring)
        log.info("stored instance %s of study %s (%s, %d bytes%s)", sop_uid, study_uid, sop_class, fields["size_bytes"],
                 ", resend" if existing else "")
        return StoredInstance(sop_uid, study_uid, path, analysable, existing)

    def _write_batch(self, records: list[_Record]) -> list[bool | BaseException]:
        """Record the instances that concurrent C-STOREs queued, in the writers' turn, in one transaction: per
        instance, check its UIDs, write its rows (none for a resend of the same bytes) and rename its staged file
        into place, in a savepoint (when there are several), so that an instance refused for its UIDs or its
        file leaves the others' rows alone. The instances are written in UID order, so that two SCP processes'
        batches lock PostgreSQL's study rows in the same order (no deadlock). The outcome of each is True for a
        resend of a stored SOP Instance UID, False for a new one, or the exception that refused it. A database
        error fails the whole batch (the transaction may be gone with it: every sender is asked to resend), as
        does a failed commit."""
        outcomes: dict[int, bool | BaseException] = {}
        try:
            with self.sessions.begin() as session:
                _begin_writing(session)
                if len(records) == 1:  # alone in its transaction: a failure rolls it back, no savepoint is needed
                    return [_record(session, records[0], savepoint=False)]
                for index in sorted(range(len(records)), key=lambda index: records[index].uids):
                    try:
                        outcomes[index] = _record(session, records[index], savepoint=True)
                    except (InvalidUIDError, OSError) as error:  # this instance is refused, the batch goes on
                        outcomes[index] = error
        except Exception as error:  # the transaction failed: nothing of the batch is committed
            return [outcomes[index] if isinstance(outcomes.get(index), InvalidUIDError) else error
                    for index in range(len(records))]
        return [outcomes[index] for index in range(len(records))]
