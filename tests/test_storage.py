"""The store's transaction: a failed or refused instance leaves no row and no file, and no other writer can file
a clashing instance between the UID check and the commit."""

from __future__ import annotations

import copy
import errno
import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import blake3
import pydicom
import pytest
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import storage
from dicom_node.storage import InstanceStore, UIDConflictError
from dicom_node.study_time import sortable_time
from tests.conftest import wait_for
from worklist.models import Instance, Series, Study, StudyState


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


def test_new_and_changed_views_revise_and_reopen_their_study_and_nothing_else_does(
        tmp_path: Path, sessions: sessionmaker, source: tuple[pydicom.Dataset, list[bytes]]) -> None:
    """A job analyses the revision its study was promoted at (``worklist.state``): only a new or changed
    analysable instance moves it on, and re-opens an analysed or failed study."""
    store = InstanceStore(tmp_path / "incoming", sessions)
    dataset, encoded = source

    def study() -> tuple[int, StudyState]:
        with sessions() as session:
            return session.execute(select(Study.revision, Study.state)).one()._tuple()

    def encoded_copy(**changes: str) -> tuple[pydicom.Dataset, list[bytes]]:
        changed = copy.deepcopy(dataset)
        for keyword, value in changes.items():
            setattr(changed, keyword, value)
        buffer = BytesIO()
        changed.save_as(buffer, enforce_file_format=True)
        return changed, [buffer.getvalue()]

    _store(store, dataset, encoded)
    assert study() == (1, StudyState.RECEIVING)
    with sessions() as session:  # the keys a C-FIND matches on
        assert session.execute(select(Study.study_time, Study.dicom_study_id)).one()._tuple() == (
            sortable_time(dataset.StudyTime), dataset.StudyID)
    with sessions.begin() as session:  # its analysis failed (an undecodable view, say)
        session.execute(update(Study).values(state=StudyState.FAILED))
    assert _store(store, dataset, encoded).duplicate and study() == (1, StudyState.FAILED)  # the same bytes again
    other = _store(store, *encoded_copy(SOPInstanceUID="1.2.3.4.5", Modality="OT",
                                        SOPClassUID="1.2.840.10008.5.1.4.1.1.7"))  # stored, never analysed
    assert not other.analysable and study() == (1, StudyState.FAILED)
    _store(store, *encoded_copy(SeriesDescription="corrected"))  # the technologist sends the view again, fixed
    assert study() == (2, StudyState.RECEIVING)


def test_a_resend_to_a_row_with_a_sha256_digest_is_recognised(
        tmp_path: Path, sessions: sessionmaker, source: tuple[pydicom.Dataset, list[bytes]]) -> None:
    """Rows stored before migration 0010 hold ``sha256:<hex>``: a resend of the same bytes still changes nothing
    (the study is not analysed again); a changed instance is recorded with its BLAKE3 digest."""
    store = InstanceStore(tmp_path / "incoming", sessions)
    dataset, encoded = source
    first = _store(store, dataset, encoded)
    legacy = "sha256:" + hashlib.sha256(encoded[0]).hexdigest()
    with sessions.begin() as session:
        session.execute(update(Instance).values(content_digest=legacy))
        session.execute(update(Study).values(state=StudyState.ANALYSED))

    def stored() -> tuple[str, StudyState]:
        with sessions() as session:
            return session.scalar(select(Instance.content_digest)), session.scalar(select(Study.state))

    assert _store(store, dataset, encoded).duplicate and stored() == (legacy, StudyState.ANALYSED)
    changed = copy.deepcopy(dataset)
    changed.SeriesDescription = "corrected"
    buffer = BytesIO()
    changed.save_as(buffer, enforce_file_format=True)
    assert _store(store, changed, [buffer.getvalue()]).duplicate
    assert stored() == ("blake3:" + blake3.blake3(buffer.getvalue()).hexdigest(), StudyState.RECEIVING)
    assert first.path.read_bytes() == buffer.getvalue()
    with sessions.begin() as session:  # emptied by a downgrade and upgrade: never taken for the same bytes
        session.execute(update(Instance).values(content_digest=""))
        session.execute(update(Study).values(state=StudyState.ANALYSED))
    _store(store, changed, [buffer.getvalue()])
    assert stored() == ("blake3:" + blake3.blake3(buffer.getvalue()).hexdigest(), StudyState.RECEIVING)


def _filed_sql(study: str, patient: str, series: str | None = None) -> list[str]:
    """SQL that files a study (SQL expressions: literals or binds) and, with ``series``, a series in it holding an
    instance of this store's SOP Instance UID."""
    statements = ["INSERT INTO study (study_instance_uid, patient_id, state, first_received_at, last_received_at, "
                  f"views_complete) VALUES ({study}, {patient}, 'RECEIVING', '2026-11-30', '2026-11-30', false)"]
    if series is not None:
        statements += [
            f"INSERT INTO series (study_id, series_instance_uid) SELECT id, {series} FROM study "
            f"WHERE study_instance_uid = {study}",
            "INSERT INTO instance (sop_instance_uid, study_id, series_id, sop_class_uid, transfer_syntax_uid, path, "
            "size_bytes, content_digest, analysable, received_at) SELECT :sop, study_id, id, '1.2', '1.2', 'x', 1, "
            f"'blake3:00', true, '2026-11-30' FROM series WHERE series_instance_uid = {series}"]
    return statements


# What another SCP process files between this store's lookup and its inserts (SQL; SQLite refuses it, the store
# holding the write lock), the reason the store then gives on PostgreSQL (None: it is stored) and the rows then
# in the study, series and instance tables.
_FILED_MEANWHILE = {
    "study-of-another-patient": (_filed_sql(":study", "'OTHER-PATIENT'"), "another Patient ID", (1, 0, 0)),
    "instance-in-another-study": (_filed_sql("'1.2.3.999'", ":patient", "'1.2.3.999.1'"),
                                  "SOP Instance UID .* is already stored in study 1.2.3.999", (1, 1, 1)),
    "the-same-instance": (_filed_sql(":study", ":patient", ":series"), None, (1, 1, 1)),
}


@pytest.mark.parametrize("meanwhile", sorted(_FILED_MEANWHILE))
def test_no_other_writer_files_a_clash_between_the_check_and_the_commit(
        tmp_path: Path, db_url: str, sessions: sessionmaker, source: tuple[pydicom.Dataset, list[bytes]],
        monkeypatch: pytest.MonkeyPatch, meanwhile: str) -> None:
    """Another SCP process files rows under this instance's UIDs right after this store's lookup: on SQLite it
    cannot (the store holds the write lock); on PostgreSQL its rows are checked, and the store is refused for a
    clash or, for the same instance, updates the row."""
    store = InstanceStore(tmp_path / "incoming", sessions)
    dataset, encoded = source
    statements, refusal, rows = _FILED_MEANWHILE[meanwhile]
    values = {"study": str(dataset.StudyInstanceUID), "series": str(dataset.SeriesInstanceUID),
              "sop": str(dataset.SOPInstanceUID), "patient": str(dataset.PatientID)}
    lookup = storage._filed
    outcome: list[str] = []

    def other_process_files_it(session: Session, study_uid: str, series_uid: str, sop_uid: str) -> object:
        found = lookup(session, study_uid, series_uid, sop_uid)
        if not outcome:
            engine = create_engine(db_url, connect_args={"timeout": 0.2} if db_url.startswith("sqlite") else {})
            try:
                with engine.begin() as connection:
                    for statement in statements:
                        connection.execute(text(statement), values)
                outcome.append("inserted")
            except OperationalError as error:
                outcome.append(str(error.orig))
            finally:
                engine.dispose()
        return found

    monkeypatch.setattr(storage, "_filed", other_process_files_it)
    if db_url.startswith("sqlite"):
        _store(store, dataset, encoded)
        assert outcome == ["database is locked"]
        assert _rows(sessions) == (1, 1, 1)
        with sessions() as session:
            assert session.scalars(select(Study.patient_id)).all() == [str(dataset.PatientID)]
    elif refusal is not None:
        with pytest.raises(UIDConflictError, match=refusal):
            _store(store, dataset, encoded)
        assert outcome == ["inserted"] and _rows(sessions) == rows
        assert [path for path in store.root.rglob("*") if path.is_file()] == []
    else:
        stored = _store(store, dataset, encoded)
        assert outcome == ["inserted"] and _rows(sessions) == rows
        with sessions() as session:  # the row is this store's
            assert session.scalar(select(Instance.size_bytes)) == len(encoded[0]) == stored.path.stat().st_size


def test_a_clash_leaves_the_stored_file_and_row_as_they_were(
        tmp_path: Path, sessions: sessionmaker, source: tuple[pydicom.Dataset, list[bytes]]) -> None:
    store = InstanceStore(tmp_path / "incoming", sessions)
    dataset, encoded = source
    first = _store(store, dataset, encoded)
    with pytest.raises(UIDConflictError):
        _store(store, *_as_other_patient(dataset))
    assert first.path.read_bytes() == encoded[0] and _rows(sessions) == (1, 1, 1)
    assert [path for path in store.root.rglob("*") if path.is_file()] == [first.path]


def _as_other_patient(dataset: pydicom.Dataset) -> tuple[pydicom.Dataset, list[bytes]]:
    other = copy.deepcopy(dataset)
    other.PatientID = "OTHER-PATIENT"
    buffer = BytesIO()
    other.save_as(buffer, enforce_file_format=True)
    return other, [buffer.getvalue()]


@pytest.mark.parametrize("failure", ["clash", "disk error", "database error"])
def test_concurrent_stores_share_one_transaction_and_a_refused_one_takes_back_only_its_own_rows(
        tmp_path: Path, sessions: sessionmaker, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch,
        failure: str) -> None:
    """Three C-STOREs queue while the writers' turn is held; they are written in one batch. The middle one clashes
    with a stored study (another patient), or its rename fails after its rows were written: it is refused, the
    other two are stored with their rows. A database error, after which the transaction may be gone, fails all
    three (each sender is asked to resend): none is answered Success for a row that was not committed."""
    store = InstanceStore(tmp_path / "incoming", sessions)
    study = sorted(next(synthetic_root.glob("*/L_CC.dcm")).parent.glob("*.dcm"))
    sources = [(pydicom.dcmread(path), [path.read_bytes()]) for path in study]
    first = _store(store, *sources[0])  # its study is now filed under its patient
    held = threading.Event()
    batches: list[int] = []

    @contextmanager
    def held_turn() -> Iterator[None]:
        assert held.wait(30)
        yield

    write_batch = store.batches.write_batch
    monkeypatch.setattr(store.batches, "turn", held_turn)
    monkeypatch.setattr(store.batches, "write_batch", lambda works: batches.append(len(works)) or write_batch(works))
    if failure == "clash":
        queued = [sources[1], _as_other_patient(sources[2][0]), sources[3]]
    elif failure == "disk error":
        queued = sources[1:]
        failing = str(queued[1][0].SOPInstanceUID) + ".dcm"
        place = storage.place

        def fail_one(staged: Path, path: Path) -> None:
            if path.name == failing:
                raise OSError(errno.EIO, "I/O error")
            place(staged, path)

        monkeypatch.setattr(storage, "place", fail_one)
    else:
        queued = sources[1:]
        write_rows = storage._write_rows

        def fail_rows(session: Session, dataset: pydicom.Dataset, *args: object) -> None:
            if dataset.SOPInstanceUID == queued[1][0].SOPInstanceUID:
                raise OperationalError("INSERT", {}, sqlite3.OperationalError("disk I/O error"))
            write_rows(session, dataset, *args)

        monkeypatch.setattr(storage, "_write_rows", fail_rows)
    outcomes: dict[int, object] = {}

    def send(index: int) -> None:
        try:
            outcomes[index] = _store(store, *queued[index])
        except Exception as error:
            outcomes[index] = error

    threads = [threading.Thread(target=send, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: store.batches.queued == 3, "three stores queued")
    held.set()
    for thread in threads:
        thread.join(60)
    assert batches == [3]
    if failure == "database error":
        assert all(isinstance(outcome, OperationalError) for outcome in outcomes.values())
        assert _rows(sessions) == (1, 1, 1)  # only the instance stored before
        return
    assert isinstance(outcomes[1], UIDConflictError if failure == "clash" else OSError)
    stored = [outcomes[0], outcomes[2]]
    assert all(isinstance(item, storage.StoredInstance) and not item.duplicate for item in stored)
    assert [item.path.read_bytes() for item in stored] == [queued[0][1][0], queued[2][1][0]]
    assert _rows(sessions) == (1, 3, 3)  # a series per view
    files = {path for path in store.root.rglob("*") if path.is_file()}
    assert files == {first.path, *(item.path for item in stored)}


def test_a_resend_racing_a_change_from_another_process_leaves_file_and_row_agreeing(
        tmp_path: Path, db_url: str, sessions: sessionmaker, source: tuple[pydicom.Dataset, list[bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Process 1 stores changed bytes Y of a stored instance and has renamed Y into place, not yet committed;
    process 2 receives the old bytes X again. On PostgreSQL process 2 used to judge X a resend against the
    digest committed before (X), rename X over Y and leave the row saying Y; now it waits for the row, sees Y
    and records X as a change: file and row agree, whichever commits last."""
    from worklist.db import make_engine, session_factory

    dataset, old = source
    changed = copy.deepcopy(dataset)
    changed.InstanceNumber = int(dataset.get("InstanceNumber", 1)) + 1
    buffer = BytesIO()
    changed.save_as(buffer, enforce_file_format=True)
    new = [buffer.getvalue()]
    first = InstanceStore(tmp_path / "incoming", sessions)
    _store(first, dataset, old)
    other_engine = make_engine(db_url)  # a second SCP process: its own engine and writer queue
    second = InstanceStore(tmp_path / "incoming", session_factory(other_engine))
    renamed, release = threading.Event(), threading.Event()
    place = storage.place

    def place_then_hold(staged: Path, path: Path) -> None:
        place(staged, path)
        if threading.current_thread().name == "changer":
            renamed.set()
            release.wait(30)

    monkeypatch.setattr(storage, "place", place_then_hold)
    changer = threading.Thread(target=_store, args=(first, changed, new), name="changer")
    changer.start()
    assert renamed.wait(30)
    resender = threading.Thread(target=_store, args=(second, dataset, old))
    resender.start()
    resender.join(1.0)  # on PostgreSQL it now waits for the row; before, it finished here
    release.set()
    changer.join(30)
    resender.join(30)
    other_engine.dispose()
    with sessions() as session:
        digest = session.scalar(select(Instance.content_digest))
    path = next(path for path in first.root.rglob("*.dcm"))
    assert digest == "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()
