"""The node end to end with real peers: /usr/bin/storescu -> node (SCP, scheduler, Celery worker process)
-> SR + SEG -> /usr/bin/storescp. Embedded (SQLite, SQLite broker) and production-like (PostgreSQL, Redis)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.node import Node
from dicom_node.settings import Destination, Settings
from models import save_model_version
from tests.conftest import IN_CI, free_port, require_tool, tiny_model
from tests.conftest import wait_for as wait_until
from tests.peers import StoreSCP
from training.synthetic import write_studies
from worklist.db import make_engine, upgrade
from worklist.models import Export, ExportState, Job, JobState, Result, Study, StudyState

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
REDIS_URL = os.environ.get("MAMMO_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture(scope="module")
def model_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_version(tiny_model(), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def slow_model_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bigger input, so one analysis takes long enough on 2 cores to kill its worker mid-job."""
    return save_model_version(tiny_model("efficientnet-b0", 1024, 640), tmp_path_factory.mktemp("model") / "b0")


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    root = tmp_path_factory.mktemp("studies")
    write_studies(root, 2, seed=91, rows=256, cols=160, progress=False)
    return [sorted(folder.glob("*.dcm")) for folder in sorted(p for p in root.iterdir() if p.is_dir())]


def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).flushdb()
    except redis.RedisError as error:
        message = f"Redis is not reachable at {REDIS_URL}: {error}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return REDIS_URL


def node_settings(tmp_path: Path, model: Path, destination: StoreSCP, db_url: str | None = None,
                  broker_url: str | None = None, **overrides: object) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", port=free_port(), model_path=model, db_url=db_url,
                        broker_url=broker_url, study_settle_seconds=0.2, job_stale_seconds=20,
                        export_backoff_seconds=0.5, device="cpu",
                        destinations=[Destination(name="pacs", ae_title="PACS", host="127.0.0.1",
                                                  port=destination.port)], **overrides)
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.database_url())
    upgrade(engine)
    engine.dispose()
    return settings


def storescu(settings: Settings, files: list[Path]) -> None:
    sent = subprocess.run([require_tool("/usr/bin/storescu"), "-aet", "MODALITY", "-aec", settings.ae_title,
                           "127.0.0.1", str(settings.port), *map(str, files)], capture_output=True, text=True,
                          timeout=120)
    assert sent.returncode == 0, sent.stderr


wait_for = partial(wait_until, timeout=180.0)  # an analysis may wait for the worker's start-up


def delivered(node: Node, study_uid: str) -> tuple[Job, list[Export]] | None:
    with node.sessions() as session:
        job = session.scalar(select(Job).join(Study).where(Study.study_instance_uid == study_uid)
                             .order_by(Job.id.desc()))
        if job is None or job.state not in (JobState.DONE, JobState.FAILED):
            return None
        exports = list(session.scalars(select(Export).where(Export.job_id == job.id)))
        if job.state == JobState.DONE and any(e.state == ExportState.PENDING for e in exports):
            return None
        return job, exports


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs").start()
    yield scp
    scp.stop()


def check_round_trip(node: Node, pacs: StoreSCP, files: list[Path]) -> None:
    storescu(node.settings, files)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    job, exports = wait_for(lambda: delivered(node, study_uid), what="analysis and delivery")
    assert job.state == JobState.DONE, job.error
    assert {e.state for e in exports} == {ExportState.DELIVERED} and len(exports) == 5
    received = pacs.received()
    by_class = {}
    for ds in received:
        by_class.setdefault(str(ds.SOPClassUID), []).append(ds)
    assert len(by_class[SR_CLASS]) == 1 and len(by_class[SEG_CLASS]) == 4
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    for seg in by_class[SEG_CLASS]:
        assert seg.StudyInstanceUID == study_uid
        assert str(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID) in sources
    with node.sessions() as session:
        result = session.scalar(select(Result).where(Result.job_id == job.id))
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        assert study.state == StudyState.ANALYSED and study.suspicion == pytest.approx(result.suspicion)
    assert set(job.timings) >= {"preprocess", "model", "heatmaps", "encode"}


@pytest.mark.slow
def test_embedded_round_trip_storescu_to_storescp(tmp_path: Path, model_version: Path, pacs: StoreSCP,
                                                   studies: list[list[Path]]) -> None:
    with Node(node_settings(tmp_path, model_version, pacs)) as node:
        check_round_trip(node, pacs, studies[0])


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # SQLite is the embedded test above
def test_production_round_trip_over_redis_and_postgresql(tmp_path: Path, model_version: Path, pacs: StoreSCP,
                                                         studies: list[list[Path]], db_url: str) -> None:
    settings = node_settings(tmp_path, model_version, pacs, db_url=db_url, broker_url=redis_url())
    with Node(settings) as node:
        check_round_trip(node, pacs, studies[1])


@pytest.mark.slow
def test_a_worker_killed_mid_job_is_replaced_and_the_job_finishes(tmp_path: Path, slow_model_version: Path,
                                                                  pacs: StoreSCP, studies: list[list[Path]]) -> None:
    with Node(node_settings(tmp_path, slow_model_version, pacs)) as node:
        storescu(node.settings, studies[0])

        def running_job() -> Job | None:
            with node.sessions() as session:
                return session.scalar(select(Job).where(Job.state == JobState.RUNNING))

        job = wait_for(running_job, what="a RUNNING job")
        victim = node.worker.process.pid
        os.kill(victim, signal.SIGKILL)
        study_uid = str(pydicom.dcmread(studies[0][0], stop_before_pixels=True).StudyInstanceUID)
        done, exports = wait_for(lambda: delivered(node, study_uid), what="the job after the worker restarted")
        assert node.worker.process.pid != victim
        assert done.id == job.id and done.state == JobState.DONE and done.attempts == 2
        assert {e.state for e in exports} == {ExportState.DELIVERED}
        assert len(pacs.received()) == 5  # delivered once


@pytest.mark.slow
def test_destination_down_then_up_is_delivered_once(tmp_path: Path, model_version: Path,
                                                    studies: list[list[Path]]) -> None:
    pacs = StoreSCP(tmp_path / "pacs")  # not started: the destination is down
    with Node(node_settings(tmp_path, model_version, pacs)) as node:
        storescu(node.settings, studies[1])

        def failed_attempts() -> bool:
            with node.sessions() as session:
                return all(e.attempts >= 2 for e in session.scalars(select(Export))) and \
                    session.scalar(select(Export.id)) is not None

        wait_for(failed_attempts, what="two failed export attempts")
        pacs.start()
        try:
            study_uid = str(pydicom.dcmread(studies[1][0], stop_before_pixels=True).StudyInstanceUID)
            _job, exports = wait_for(lambda: delivered(node, study_uid), what="delivery after the PACS came up")
            assert {e.state for e in exports} == {ExportState.DELIVERED}
            time.sleep(2)  # nothing is sent again
            assert len(pacs.received()) == 5
        finally:
            pacs.stop()


@pytest.mark.slow
def test_a_study_without_screening_views_fails_with_a_reason(tmp_path: Path, model_version: Path, pacs: StoreSCP,
                                                            studies: list[list[Path]]) -> None:
    from pydicom.uid import generate_uid

    unlabeled = []
    study_uid, series_uid = generate_uid(), generate_uid()
    for source in studies[0]:
        ds = pydicom.dcmread(source)
        del ds.ViewPosition, ds.ViewCodeSequence  # an MG image with no view: stored, never scored
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        unlabeled.append(tmp_path / source.name)
        ds.save_as(unlabeled[-1])
    settings = node_settings(tmp_path, model_version, pacs, study_inactivity_timeout=1.0)
    with Node(settings) as node:
        storescu(settings, unlabeled)
        job, exports = wait_for(lambda: delivered(node, study_uid), what="the job to finish")
        assert job.state == JobState.FAILED and job.attempts == 1 and exports == []
        assert "no screening view" in job.error
        with node.sessions() as session:
            assert session.scalar(select(Study.state).where(Study.study_instance_uid == study_uid)) == \
                StudyState.FAILED
    assert pacs.received() == []


@pytest.mark.slow
def test_an_activated_model_version_is_served_from_the_next_job_without_a_restart(
        tmp_path: Path, model_version: Path, pacs: StoreSCP, studies: list[list[Path]]) -> None:
    from training.registry import activate, register

    other = save_model_version(tiny_model(seed=1), tmp_path / "other")  # other weights: another version
    with Node(node_settings(tmp_path, model_version, pacs)) as node:
        register(node.sessions, model_version, name="site-v1")
        register(node.sessions, other, name="site-v2")
        activate(node.sessions, "site-v1")
        worker_pid = node.worker.process.pid
        for files, name in ((studies[0], "site-v1"), (studies[1], "site-v2")):
            storescu(node.settings, files)
            study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            job, _ = wait_for(lambda uid=study_uid: delivered(node, uid), what="analysis and delivery")
            assert job.state == JobState.DONE and job.model_version.startswith(f"{name}@"), job.model_version
            activate(node.sessions, "site-v2")
        assert node.worker.process.pid == worker_pid  # the same worker process loaded the new version
    srs = [ds for ds in pacs.received() if str(ds.SOPClassUID) == SR_CLASS]
    named = {str(value).split("@")[0] for ds in srs for item in ds.ContributingEquipmentSequence
             for value in item.get("SoftwareVersions", []) if str(value).startswith("model ")}
    assert named == {"model site-v1", "model site-v2"}  # each SR names the version that produced it


def test_a_changed_image_gets_a_new_analysis_whose_sr_supersedes_the_first(
        tmp_path: Path, model_version: Path, pacs: StoreSCP, studies: list[list[Path]]) -> None:
    """A view sent again with other content re-opens its study; the new SR names the first as its predecessor
    (Predecessor Documents Sequence), so a viewer or PACS knows which report is current."""
    files = studies[0]
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with Node(node_settings(tmp_path, model_version, pacs)) as node:
        storescu(node.settings, files)
        first, _ = wait_for(lambda: delivered(node, study_uid), what="the first analysis")
        changed = pydicom.dcmread(files[0])
        changed.InstanceNumber = int(changed.get("InstanceNumber", 1)) + 100
        changed.save_as(tmp_path / "changed.dcm")
        storescu(node.settings, [tmp_path / "changed.dcm"])
        second, _ = wait_for(lambda: (found := delivered(node, study_uid)) and found[0].id > first.id and found,
                             what="the second analysis")
    assert first.state == second.state == JobState.DONE
    srs = {str(ds.SeriesInstanceUID): ds for ds in pacs.received()
           if str(ds.SOPClassUID) == SR_CLASS and str(ds.StudyInstanceUID) == study_uid}
    assert len(srs) == 2
    newest = next(ds for ds in srs.values() if "PredecessorDocumentsSequence" in ds)
    (item,) = newest.PredecessorDocumentsSequence
    (series,) = item.ReferencedSeriesSequence
    (earlier,) = series.ReferencedSOPSequence
    older = srs[str(series.SeriesInstanceUID)]
    assert "PredecessorDocumentsSequence" not in older
    assert str(earlier.ReferencedSOPInstanceUID) == str(older.SOPInstanceUID)
    assert str(item.StudyInstanceUID) == study_uid
