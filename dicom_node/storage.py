"""Received instances: validated UIDs -> safe paths, atomic fsynced files, and their worklist rows.

The order is what makes "nothing lost" true: the file is complete on disk (temp file, fsync, rename, fsync of
the folder) and its row is committed before the Storage SCP answers Success. A resend of the same SOP
Instance UID rewrites the same path and updates the same row, so it is idempotent; a resend of the same bytes
changes nothing (an analysed study is not analysed again for it), a changed instance re-opens its study.

A SOP Instance UID is filed under one study, series and patient only. An instance whose UIDs clash with what is
stored (its SOP Instance UID already in another study or series, its series in another study, or its study
stored under another Patient ID) is refused with ``UIDConflictError`` before anything is written, so that no
patient's image is ever analysed in another patient's study; the first instance stays as it was.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom.dsutils import encode_file_meta
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.validation import check_instance
from models.errors import NodeError
from models.sop_classes import MAMMOGRAPHY_SOP_CLASSES
from worklist.models import Instance, Series, Study, StudyState, utcnow

log = logging.getLogger(__name__)

# PS3.5 §9.1: components of digits without leading zeros (except "0"), dot-separated, at most 64 characters.
UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


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


def atomic_write(path: Path, data: bytes | Sequence[bytes]) -> None:
    """Write ``data`` (bytes, or parts written one after the other) so that ``path`` is either absent, the old
    file, or the complete new file."""
    parts = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    temporary = path.parent / f".{uuid.uuid4().hex}.part"
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(descriptor, "wb") as handle:
            for part in parts:
                handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def sha256_of(parts: Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def file_parts(file_meta: FileMetaDataset, dataset: bytes) -> tuple[bytes, bytes]:
    """A received dataset as the two parts of its DICOM file: preamble, prefix and file meta; the dataset."""
    return b"\0" * 128 + b"DICM" + encode_file_meta(file_meta), dataset


@dataclass(frozen=True)
class StoredInstance:
    """What the store did with one instance."""

    sop_instance_uid: str
    study_instance_uid: str
    path: Path
    analysable: bool
    duplicate: bool


def _get_or_create(session: Session, model: type, key: str, value: str, **fields: object) -> object:
    """Select by a unique key, or insert; a concurrent insert of the same key is re-selected."""
    found = session.scalar(select(model).where(getattr(model, key) == value))
    if found is not None:
        return found
    try:
        with session.begin_nested():
            row = model(**{key: value}, **fields)
            session.add(row)
        return row
    except IntegrityError:
        return session.scalars(select(model).where(getattr(model, key) == value)).one()


def _conflict(session: Session, sop_uid: str, series_uid: str, study_uid: str, patient_id: str | None) -> str | None:
    """Why this instance clashes with the stored ones, or None. Names UIDs only, never a patient."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is not None and study.patient_id and patient_id and study.patient_id != patient_id:
        return f"study {study_uid} is already stored under another Patient ID"
    series = session.scalar(select(Series).where(Series.series_instance_uid == series_uid))
    if series is not None and series.study.study_instance_uid != study_uid:
        return f"series {series_uid} is already stored in study {series.study.study_instance_uid}"
    instance = session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))
    if instance is not None and (instance.study.study_instance_uid, instance.series.series_instance_uid) != \
            (study_uid, series_uid):
        return (f"SOP Instance UID {sop_uid} is already stored in study {instance.study.study_instance_uid}, series "
                f"{instance.series.series_instance_uid}")
    return None


class InstanceStore:
    """Files under ``root`` and rows in the worklist database, written together."""

    def __init__(self, root: Path, sessions: sessionmaker[Session]) -> None:
        self.root = Path(root)
        self.sessions = sessions

    def store(self, encoded: Sequence[bytes], dataset: Dataset, transfer_syntax_uid: str,
              calling_ae: str) -> StoredInstance:
        """Write one received instance (its DICOM file as parts: preamble and file meta, then the dataset as
        received, whose element structure the caller has checked, e.g. with ``decode_received``) and commit its
        rows. Raises on any failure (nothing is claimed): ``InvalidUIDError`` (``UIDConflictError``) and
        ``MalformedInstanceError`` for a dataset that must not be stored, before anything is written. A database
        failure leaves a complete file without a row, which the resend the sender is asked for (0xA700)
        rewrites."""
        study_uid = validated_uid(dataset.get("StudyInstanceUID"), "StudyInstanceUID")
        series_uid = validated_uid(dataset.get("SeriesInstanceUID"), "SeriesInstanceUID")
        sop_uid = validated_uid(dataset.get("SOPInstanceUID"), "SOPInstanceUID")
        sop_class = validated_uid(dataset.get("SOPClassUID"), "SOPClassUID")
        check_instance(dataset, transfer_syntax_uid)
        patient_id = str(dataset.get("PatientID") or "")[:64] or None
        with self.sessions() as session:
            reason = _conflict(session, sop_uid, series_uid, study_uid, patient_id)
        if reason is not None:
            raise UIDConflictError(f"{reason}; refused so that no image is filed under two studies or patients")
        path = instance_path(self.root, study_uid, series_uid, sop_uid)
        analysable = sop_class in MAMMOGRAPHY_SOP_CLASSES and dataset.get("Modality") == "MG"
        fields = {
            "sop_class_uid": sop_class, "transfer_syntax_uid": transfer_syntax_uid,
            "laterality": str(dataset.get("ImageLaterality") or dataset.get("Laterality") or "")[:2] or None,
            "view": str(dataset.get("ViewPosition") or "")[:16] or None, "analysable": analysable,
            "path": str(path.relative_to(self.root)), "size_bytes": sum(map(len, encoded)),
            "sha256": sha256_of(encoded), "calling_ae": calling_ae[:16],
        }
        existed = path.exists()
        atomic_write(path, encoded)
        try:
            existing = self._record(dataset, (study_uid, series_uid, sop_uid), patient_id, fields)
        except UIDConflictError:
            if not existed:  # a clash committed meanwhile by another process: the file is nobody's
                path.unlink(missing_ok=True)
            raise
        log.info("stored instance %s of study %s (%s, %d bytes%s)", sop_uid, study_uid, sop_class, fields["size_bytes"],
                 ", resend" if existing else "")
        return StoredInstance(sop_uid, study_uid, path, analysable, existing)

    def _record(self, dataset: Dataset, uids: tuple[str, str, str], patient_id: str | None,
                fields: dict[str, object]) -> bool:
        """Commit the rows of a written instance; True if it was a resend. Re-checks the UIDs in the transaction."""
        study_uid, series_uid, sop_uid = uids
        with self.sessions.begin() as session:
            reason = _conflict(session, sop_uid, series_uid, study_uid, patient_id)
            if reason is not None:  # stored by another process meanwhile
                raise UIDConflictError(f"{reason}; refused so that no image is filed under two studies or patients")
            study = _get_or_create(
                session, Study, "study_instance_uid", study_uid,
                accession_number=str(dataset.get("AccessionNumber") or "")[:16] or None, patient_id=patient_id,
                patient_name=str(dataset.get("PatientName") or "")[:324] or None,
                study_date=str(dataset.get("StudyDate") or "")[:8] or None)
            series = _get_or_create(session, Series, "series_instance_uid", series_uid, study=study,
                                    modality=str(dataset.get("Modality") or "")[:16] or None)
            existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))
            if existing is not None and existing.sha256 == fields["sha256"]:
                # The same bytes again (a sender resending after a lost response or a failed association):
                # nothing new to analyse, so the study is not re-opened (that would send a second SR and SEGs).
                return True
            if existing is None:
                session.add(Instance(sop_instance_uid=sop_uid, study=study, series=series, **fields))
            else:
                for name, value in fields.items():
                    setattr(existing, name, value)
                existing.received_at = utcnow()
            study.last_received_at = utcnow()
            if study.state == StudyState.ANALYSED and fields["analysable"]:
                study.state = StudyState.RECEIVING  # a new or changed instance: the study will be analysed again
        return existing is not None
