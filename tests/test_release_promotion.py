"""A study is READY as soon as its sender releases the association with the four views in, not after settling."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.scp import start_scp
from dicom_node.settings import Settings
from dicom_node.storage import InstanceStore
from tests.conftest import free_port
from tests.test_scp import Node, storescu
from training.synthetic import write_studies
from worklist.db import make_engine, session_factory
from worklist.models import Job, JobState, Study, StudyState


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("send")
    write_studies(root, 1, seed=37, rows=256, cols=160, progress=False)
    return sorted(root.glob("*/*.dcm"))


@pytest.fixture
def node(db_url: str, tmp_path: Path) -> Iterator[tuple[Node, threading.Event]]:
    """An SCP whose settle time is an hour: only a release can make a study READY during the test."""
    settings = Settings(data_dir=tmp_path / "data", port=free_port(), db_url=db_url, study_settle_seconds=3600)
    engine = make_engine(settings.database_url())
    sessions = session_factory(engine)
    woken = threading.Event()
    server = start_scp(settings, InstanceStore(settings.incoming_dir, sessions), on_ready=woken.set)
    yield Node(settings, sessions, settings.incoming_dir), woken
    server.shutdown()
    engine.dispose()


def study_and_jobs(node: Node) -> tuple[StudyState, list[JobState]]:
    with node.sessions() as session:
        study = session.scalars(select(Study)).one()
        return study.state, list(session.scalars(select(Job.state).where(Job.study_id == study.id)))


def test_released_association_with_four_views_makes_the_study_ready(node, study_files: list[Path]) -> None:
    scp, woken = node
    assert storescu(scp, *study_files).returncode == 0
    assert woken.wait(10), "the node was not told a study became READY"
    assert study_and_jobs(scp) == (StudyState.READY, [JobState.READY])


def test_missing_view_waits_for_the_timeout(node, study_files: list[Path]) -> None:
    scp, woken = node
    assert storescu(scp, *study_files[:3]).returncode == 0
    assert not woken.wait(1.0)
    assert study_and_jobs(scp) == (StudyState.RECEIVING, [])


def test_aborted_association_leaves_the_study_to_settle(node, study_files: list[Path]) -> None:
    scp, woken = node
    ae = AE(ae_title="ABORTER")
    datasets = [pydicom.dcmread(path) for path in study_files]
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.settings.port, ae_title=scp.settings.ae_title)
    assert assoc.is_established
    assert all(int(assoc.send_c_store(ds).Status) == 0 for ds in datasets)
    assoc.abort()
    assert not woken.wait(1.0)
    assert study_and_jobs(scp) == (StudyState.RECEIVING, [])
