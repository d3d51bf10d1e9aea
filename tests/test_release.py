"""When a complete study is analysed: at its sender's release, or after the settle time unless its sender is
still sending it (``dicom_node.release``), over a real association."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.release import ReleaseTracker
from dicom_node.scheduler import Scheduler
from dicom_node.scp import start_scp
from dicom_node.settings import Settings
from dicom_node.storage import InstanceStore
from tests.conftest import free_port
from worklist.db import make_engine, session_factory
from worklist.models import Job, Study


def _analysed(sessions: object) -> set[str]:
    with sessions() as session:
        return set(session.scalars(select(Study.study_instance_uid).join(Job)).all())


def test_a_study_its_sender_is_still_sending_is_not_settled_under_it(db_url: str, tmp_path: Path,
                                                                      synthetic_root: Path) -> None:
    """Four views in, quiet past the settle time, the association still open: the sender may be sending a fifth
    image (a large one, slowly), so the study waits; once the sender moves on to another study it is analysed."""
    settings = Settings(data_dir=tmp_path / "data", port=free_port(), db_url=db_url, study_settle_seconds=0.2)
    engine = make_engine(settings.database_url())
    sessions = session_factory(engine)
    store = InstanceStore(settings.incoming_dir, sessions)
    senders = ReleaseTracker(sessions, settings.study_inactivity_timeout, None, store.writers.turn)
    scheduler = Scheduler(settings, sessions, lambda job: "task", lambda job: "")
    scheduler.busy = senders.busy
    server = start_scp(settings, store, senders=senders)
    first, second = (sorted(folder.glob("*.dcm")) for folder in sorted(p for p in synthetic_root.iterdir()
                                                                       if p.is_dir())[:2])
    uid = {name: str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
           for name, files in (("first", first), ("second", second))}
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(str(pydicom.dcmread(first[0], stop_before_pixels=True).SOPClassUID),
                             "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
    try:
        assert assoc.is_established
        for path in first:
            assert assoc.send_c_store(path).Status == 0
        time.sleep(0.5)  # past the settle time
        scheduler.tick()
        assert _analysed(sessions) == set()  # its sender may still send it an image
        assert assoc.send_c_store(second[0]).Status == 0  # the sender moved on
        scheduler.tick()
        assert _analysed(sessions) == {uid["first"]}
    finally:
        assoc.release()
        server.shutdown()
        engine.dispose()
    assert senders.busy() == set()
