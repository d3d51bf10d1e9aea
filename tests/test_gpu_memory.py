"""GPU memory per job: the measuring context manager, the analyser's output, the job column (migration 0009),
``complete_job``, the ``mammo_gpu_memory_peak_bytes{worker}`` gauge and the study page."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, select, text, update
from sqlalchemy.orm import Session, sessionmaker

import models.device_memory
from dicom_node.analysis import AnalysisOutput, Analyzer
from models.device_memory import peak_cuda_memory
from tests.test_api import get, make_settings
from tests.test_worklist_state import ready_job
from tests.worklist_rows import add_study
from worklist.api import ApiServer, serve_api_in_thread
from worklist.db import MIGRATIONS, make_engine, session_factory, upgrade
from worklist.models import Job, Study, StudyState
from worklist.state import claim_job, complete_job


@pytest.fixture
def server(db_url: str, sessions: sessionmaker[Session], tmp_path: Path) -> Iterator[ApiServer]:
    settings = make_settings(tmp_path, db_url)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    api = serve_api_in_thread(settings, sessions)
    yield api
    api.stop()


def test_off_cuda_the_peak_is_none_and_torch_cuda_is_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: object) -> None:
        raise AssertionError("torch.cuda touched on a CPU device")

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", forbidden)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", forbidden)
    for device in ("cpu", torch.device("mps")):
        with peak_cuda_memory(device) as peak:
            torch.ones(1024)
        assert peak.bytes is None


def test_on_cuda_the_stats_are_reset_before_and_read_after(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(models.device_memory.torch.cuda, "reset_peak_memory_stats",
                        lambda device: calls.append(("reset", device)))
    monkeypatch.setattr(models.device_memory.torch.cuda, "max_memory_allocated",
                        lambda device: calls.append(("max", device)) or 12345)
    with peak_cuda_memory("cuda:0") as peak:
        assert calls == [("reset", torch.device("cuda:0"))] and peak.bytes is None
    assert calls[-1] == ("max", torch.device("cuda:0")) and peak.bytes == 12345


def test_the_analyser_reports_the_peak_of_its_model_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.device_memory.torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(models.device_memory.torch.cuda, "max_memory_allocated", lambda device: 2 ** 30)
    timings = {"model": 1.0}
    for device, expected in (("cpu", None), ("cuda:0", 2 ** 30)):
        analyzer = SimpleNamespace(serving=SimpleNamespace(device=torch.device(device)),
                                   _analyse=lambda *_: AnalysisOutput(None, [], Path(), timings=dict(timings)))
        output = Analyzer.analyse(analyzer, "1.2.3", 1, [])  # type: ignore[arg-type]
        assert output.gpu_memory_peak_bytes == expected and output.timings == timings  # not a timing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_real_cuda_allocation_is_measured() -> None:
    size = 64 * 2 ** 20
    with peak_cuda_memory("cuda") as peak:
        block = torch.empty(size, dtype=torch.uint8, device="cuda")
        del block
    assert peak.bytes is not None and peak.bytes >= size


def test_migration_0009_adds_the_column_and_its_downgrade_keeps_the_rows(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'worklist.sqlite'}")
    upgrade(engine)
    column = {c["name"]: c for c in inspect(engine).get_columns("job")}["gpu_memory_peak_bytes"]
    assert column["nullable"] and str(column["type"]) == "BIGINT"
    add_study(session_factory(engine), 1, StudyState.ANALYSED, 0.5)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:  # foreign keys on: a table copy of job would cascade to its result
        config.attributes["connection"] = connection
        command.downgrade(config, "0008")
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT COUNT(*) FROM result")) == 1
    assert "gpu_memory_peak_bytes" not in {c["name"] for c in inspect(engine).get_columns("job")}
    upgrade(engine)
    assert "gpu_memory_peak_bytes" in {c["name"] for c in inspect(engine).get_columns("job")}
    engine.dispose()


def test_complete_job_records_the_peak(sessions: sessionmaker[Session]) -> None:
    peaks = {}
    for uid, peak in (("1.2.3.91", 3 * 2 ** 30), ("1.2.3.92", None)):
        job_id = ready_job(sessions, uid)
        claim = claim_job(sessions, job_id, "gpu-host:1", timedelta(seconds=60))
        assert complete_job(sessions, claim, {}, 0.5, {"model": 1.0}, "m", [], gpu_memory_peak_bytes=peak)
        peaks[job_id] = peak
    with sessions() as session:
        assert dict(session.execute(select(Job.id, Job.gpu_memory_peak_bytes)).all()) == peaks


def set_job(sessions: sessionmaker[Session], uid: str, worker: str, peak: int | None) -> None:
    with sessions.begin() as session:
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == uid))
        session.execute(update(Job).where(Job.study_id == study_id).values(worker=worker, gpu_memory_peak_bytes=peak))


def gpu_samples(server: ApiServer) -> dict[str, float]:
    status, body, _ = get(f"{server.url}/metrics")
    assert status == 200
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
            if line.startswith("mammo_gpu_memory_peak_bytes{")}


def test_metrics_show_each_workers_newest_peak_and_nothing_without_one(sessions: sessionmaker[Session],
                                                                     server: ApiServer) -> None:
    set_job(sessions, add_study(sessions, 1, StudyState.ANALYSED, 0.5), "cpu-host:1", None)
    assert gpu_samples(server) == {}
    for number, worker, peak in ((2, "gpu-a:1", 100), (3, "gpu-b:1", 200), (4, "gpu-a:1", 300),
                                 (5, "cpu-host:1", None)):
        set_job(sessions, add_study(sessions, number, StudyState.ANALYSED, 0.5), worker, peak)
    assert gpu_samples(server) == {'mammo_gpu_memory_peak_bytes{worker="gpu-a:1"}': 300,
                                   'mammo_gpu_memory_peak_bytes{worker="gpu-b:1"}': 200}


def test_the_study_page_shows_the_peak_only_when_recorded(sessions: sessionmaker[Session], server: ApiServer) -> None:
    on_gpu = add_study(sessions, 1, StudyState.ANALYSED, 0.5)
    set_job(sessions, on_gpu, "gpu-a:1", int(1.23 * 2 ** 30))
    on_cpu = add_study(sessions, 2, StudyState.ANALYSED, 0.5)
    assert "GPU memory peak 1.23 GiB" in get(f"{server.url}/studies/{on_gpu}")[1].decode()
    assert "GPU memory" not in get(f"{server.url}/studies/{on_cpu}")[1].decode()
    assert json.loads(get(f"{server.url}/api/studies/{on_gpu}")[1])["gpu_memory_peak_bytes"] == int(1.23 * 2 ** 30)
