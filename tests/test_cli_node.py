"""The node's operating commands (echo, send, status, studies, retry-exports) and the end-to-end demo, run as
real subprocesses against a running node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.node import Node
from dicom_node.settings import Settings
from models import save_model_version
from tests.conftest import free_port, tiny_model
from worklist.db import make_engine, upgrade


def run_cli(*args: str, settings: Settings, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env()}
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def unstarted_node(tmp_path: Path, embedded_worker: bool = True, **overrides: object) -> Node:
    """A node on a fresh migrated SQLite database under ``tmp_path``, not started."""
    settings = Settings(data_dir=tmp_path / "data", port=free_port(), **overrides)
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.database_url())
    upgrade(engine)
    engine.dispose()
    return Node(settings, embedded_worker=embedded_worker)


@pytest.fixture
def receiving_node(tmp_path: Path) -> Iterator[Node]:
    """A node that receives but runs no worker, so what it stores stays waiting."""
    with unstarted_node(tmp_path, embedded_worker=False, study_settle_seconds=0.1,
                        allowed_calling_aes=["MAMMO_AI", "MODALITY"]) as node:
        yield node


def test_echo_send_status_and_studies(receiving_node: Node, synthetic_root: Path) -> None:
    settings = receiving_node.settings
    echo = run_cli("echo", settings=settings)
    assert echo.returncode == 0 and "success" in echo.stdout, echo.stderr
    study = next(p for p in synthetic_root.iterdir() if p.is_dir())
    sent = run_cli("send", str(study), settings=settings)
    assert sent.returncode == 0 and "sent 4 of 4" in sent.stdout, sent.stderr
    status = json.loads(run_cli("status", "--json", settings=settings).stdout)
    assert status["instances"] == 4 and sum(status["studies"].values()) == 1
    assert "broker.sqlite" in status["broker"]
    listing = json.loads(run_cli("studies", "--json", settings=settings).stdout)
    assert listing[0]["views"] == ["LCC", "RCC", "LMLO", "RMLO"] and listing[0]["missing_views"] == []
    assert "patient" not in json.dumps(listing).lower()
    table = run_cli("studies", settings=settings).stdout
    assert listing[0]["study_instance_uid"] in table
    assert "0 failed export(s)" in run_cli("retry-exports", settings=settings).stdout


def test_echo_to_a_dead_peer_fails_clearly(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", port=free_port())
    result = run_cli("echo", settings=settings, timeout=60)
    assert result.returncode == 1 and "refused or did not answer" in result.stderr


def test_send_refuses_an_unknown_destination(tmp_path: Path, synthetic_root: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    result = run_cli("send", str(synthetic_root), "--to", "pacs", settings=settings, timeout=60)
    assert result.returncode == 2 and "no destination named 'pacs'" in result.stderr


@pytest.mark.slow
def test_demo_runs_the_whole_path(tmp_path: Path) -> None:
    version = save_model_version(tiny_model(), tmp_path / "tiny")
    settings = Settings(data_dir=tmp_path / "data", device="cpu")
    result = run_cli("demo", "--model", str(version), settings=settings, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert ": DONE " in out and "study suspicion" in out and "NOT a clinical model" in out
    results = sorted((tmp_path / "data" / "results").rglob("*.dcm"))
    assert {p.name for p in results} == {"SR.dcm", "SEG_LCC.dcm", "SEG_RCC.dcm", "SEG_LMLO.dcm", "SEG_RMLO.dcm"}
    delivered = sorted((tmp_path / "data" / "demo-pacs").glob("*.dcm"))
    assert len(delivered) == 5 and all(str(p) in out for p in delivered)
    overlays = sorted((tmp_path / "data" / "results").rglob("overlay_*.png"))
    assert len(overlays) == 4 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in overlays)


def test_the_worker_supervisor_survives_a_failed_restart(tmp_path: Path) -> None:
    """A worker that died of memory exhaustion may not be replaceable at once (fork fails with ENOMEM): the
    supervisor keeps trying, instead of its thread dying and leaving the node with no worker for good."""
    import errno
    import threading

    node = unstarted_node(tmp_path)
    starts: list[str] = []
    restarted = threading.Event()

    class Worker:
        name = "host:1"

        def exited(self) -> int | None:
            return None if restarted.is_set() else -9

        def start(self) -> None:
            starts.append("try")
            if len(starts) < 3:
                raise OSError(errno.ENOMEM, "Cannot allocate memory")
            restarted.set()

    node.worker = Worker()
    released: list[str] = []
    node.scheduler.worker_died = released.append
    supervisor = threading.Thread(target=node._supervise, daemon=True)
    supervisor.start()
    assert restarted.wait(30)
    node._stop.set()
    supervisor.join(10)
    node.engine.dispose()
    assert starts == ["try", "try", "try"] and released == ["host:1"]


def test_the_node_kills_its_worker_when_a_job_it_runs_goes_stale(tmp_path: Path) -> None:
    """A worker stuck in C code with the GIL held sends no heartbeat and cannot end itself: when the scheduler
    finds its job stale (and puts it back on the queue), the node kills that worker, which the supervisor then
    restarts. A stale job of another worker (another host's) kills nothing here."""
    from datetime import timedelta

    from sqlalchemy import update

    from tests.test_worklist_state import ready_job
    from worklist.models import Job, JobState, utcnow
    from worklist.state import claim_job, job_state

    node = unstarted_node(tmp_path, job_stale_seconds=2)
    kills: list[str] = []

    class Worker:
        name = "host:7"

        def exited(self) -> int | None:
            return None

        def kill(self) -> None:
            kills.append(self.name)

    node.worker = Worker()
    sent: list[int] = []
    node.scheduler.send_analysis = lambda job: sent.append(job) or "task"
    ours, theirs = ready_job(node.sessions, "1.2.3.90"), ready_job(node.sessions, "1.2.3.91")
    claim_job(node.sessions, ours, "host:7", timedelta(seconds=2))
    claim_job(node.sessions, theirs, "elsewhere:7", timedelta(seconds=2))
    node.scheduler._last_stale_check = 0.0
    node.scheduler.tick()
    assert kills == [] and sent == []  # beating
    with node.sessions.begin() as session:  # silent for 5 s > 2 s
        session.execute(update(Job).values(heartbeat_at=utcnow() - timedelta(seconds=5)))
    node.scheduler._last_stale_check = 0.0
    node.scheduler.tick()
    assert kills == ["host:7"] and sorted(sent) == sorted([ours, theirs])
    assert job_state(node.sessions, ours) == job_state(node.sessions, theirs) == JobState.QUEUED
    node.engine.dispose()
