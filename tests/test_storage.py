"""The store's transaction: a failed or refused instance leaves no row and no file, and no other writer can file
a clashing instance between the UID check and the commit."""

from __future__ import annotations

import copy
import errno
import sqlite3
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import create_engine, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import storage
from dicom_node.storage import InstanceStore, UIDConflictError
from worklist.models import Instance, Series, Study


@pytest.fixture
def source(synthetic_root: Path) -> tuple[pydicom.Dataset, list[bytes]]:
    path = next(synthetic_root.glob("*/L_CC.dcm"))
    return pydicom.dcmread(path), [path.read_bytes()]


def _store(store: InstanceStore, dataset: pydicom.Dataset, encoded: list[bytes]) -> storage.StoredInstance:
    return store.store(encoded, dataset, str(dataset.file_meta.TransferSyntaxUID), "MODALITY")


def _rows(sessions: sessionmaker) -> tuple[int, int, int]:
    with sessions() as session:
        return tuple(session.scalar(select(func.count()).select_from(model)) for model in (Study, Series, Instance))


def test_a_store_that_fails_before_its_commit_leaves_no_row_and_no_file(
        tmp_path: Path, sessions: sessionmaker, source: tuple[pydicom.Dataset, list[bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = InstanceStore(tmp_path / "incoming", sessions)
    dataset, encoded = source

    def disk_error(staged: Path, path: Path) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(storage, "place", disk_error)
    with pytest.raises(OSError):
        _store(store, dataset, encoded)
    # the study and series were inserted (a savepoint each) before the failure: rolled back with the rest
    assert _rows(sessions) == (0, 0, 0)
    assert [path for path in store.root.rglob("*") if path.is_file()] == []
    monkeypatch.undo()
    stored = _store(store, dataset, encoded)  # the sender's resend
    assert _rows(sessions) == (1, 1, 1) and stored.path.read_bytes() == encoded[0]


def test_a_resend_of_the_same_bytes_writes_its_file_again(
        tmp_path: Path, sessions: sessionmaker, source: tuple[pydicom.Dataset, list[bytes]]) -> None:
    store = InstanceStore(tmp_path / "incoming", sessions)
    dataset, encoded = source
    first = _store(store, dataset, encoded)
    # A crash after the commit, before the folder's fsync, lost the rename; the sender had no Success.
    first.path.unlink()
    resent = _store(store, dataset, encoded)
    assert resent.duplicate and resent.path.read_bytes() == encoded[0]  # a resend, and its file is back
    # ...or the rename of a changed version was lost: the file is older than its row.
    first.path.write_bytes(b"an older version")
    assert _store(store, dataset, encoded).path.read_bytes() == encoded[0]
    assert _rows(sessions) == (1, 1, 1)


def test_no_other_writer_files_a_clash_between_the_check_and_the_commit(
        tmp_path: Path, db_url: str, sessions: sessionmaker, source: tuple[pydicom.Dataset, list[bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another SCP process files the same StudyInstanceUID for another patient right after this store's lookup:
    on SQLite it cannot (the store holds the write lock), on PostgreSQL its row is checked and the store refused."""
    store = InstanceStore(tmp_path / "incoming", sessions)
    dataset, encoded = source
    lookup = storage._filed
    outcome: list[str] = []

    def other_process_files_it(session: Session, study_uid: str, series_uid: str, sop_uid: str) -> object:
        found = lookup(session, study_uid, series_uid, sop_uid)
        if not outcome:
            if db_url.startswith("sqlite"):
                other = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=0.2)
                try:
                    other.execute("INSERT INTO study (study_instance_uid, patient_id, state, first_received_at, "
                                  "last_received_at, views_complete) VALUES (?, 'OTHER-PATIENT', 'RECEIVING', "
                                  "'2026-11-30', '2026-11-30', 0)", (study_uid,))
                    other.commit()
                    outcome.append("inserted")
                except sqlite3.OperationalError as error:
                    outcome.append(str(error))
                finally:
                    other.close()
            else:
                engine = create_engine(db_url)
                with engine.begin() as connection:
                    connection.execute(insert(Study).values(study_instance_uid=study_uid, patient_id="OTHER-PATIENT"))
                engine.dispose()
                outcome.append("inserted")
        return found

    monkeypatch.setattr(storage, "_filed", other_process_files_it)
    if db_url.startswith("sqlite"):
        _store(store, dataset, encoded)
        assert outcome == ["database is locked"]
        with sessions() as session:
            assert session.scalars(select(Study.patient_id)).all() == [str(dataset.PatientID)]
    else:
        with pytest.raises(UIDConflictError, match="another Patient ID"):
            _store(store, dataset, encoded)
        assert outcome == ["inserted"] and _rows(sessions) == (1, 0, 0)
        assert [path for path in store.root.rglob("*") if path.is_file()] == []


def test_a_clash_leaves_the_stored_file_and_row_as_they_were(
        tmp_path: Path, sessions: sessionmaker, source: tuple[pydicom.Dataset, list[bytes]]) -> None:
    store = InstanceStore(tmp_path / "incoming", sessions)
    dataset, encoded = source
    first = _store(store, dataset, encoded)
    other = copy.deepcopy(dataset)
    other.PatientID = "OTHER-PATIENT"
    buffer = BytesIO()
    other.save_as(buffer, enforce_file_format=True)
    with pytest.raises(UIDConflictError):
        _store(store, other, [buffer.getvalue()])
    assert first.path.read_bytes() == encoded[0] and _rows(sessions) == (1, 1, 1)
    assert [path for path in store.root.rglob("*") if path.is_file()] == [first.path]
