"""Production mode without docker: the node (`serve --no-worker`), a gpu-queue worker and an io-queue worker as
three separate `mammo-node` processes over the local Redis and PostgreSQL. A study goes from /usr/bin/storescu
to delivery at a local Storage SCP; the API and /metrics of the node process report it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.settings import Settings
from tests.conftest import free_port
from tests.peers import StoreSCP, wait_for_port
from tests.test_node_e2e import (  # noqa: F401  (fixtures)
    SEG_CLASS,
    SR_CLASS,
    delivered,
    model_version,
    redis_url,
    storescu,
    studies,
    wait_for,
)
from worklist.db import make_engine, session_factory
from worklist.models import ExportState, JobState

TOKEN = "production-test-token"


class Processes:
    """The node and its workers, each logging to its own file; stopped with SIGTERM, then killed."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.running = env, logs, {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        self.running[name] = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", *args], env=self.env,
                                              stdout=log, stderr=subprocess.STDOUT)
        return self.running[name]

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in self.running.values():
            process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs").start()
    yield scp
    scp.stop()


def _get(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_node_gpu_worker_and_io_worker_as_three_processes(tmp_path: Path, model_version: Path,  # noqa: F811
                                                          studies: list[list[Path]], db_url: str,  # noqa: F811
                                                          pacs: StoreSCP) -> None:
    settings = Settings(data_dir=tmp_path / "data", port=free_port(), api_port=free_port(), api_token=TOKEN,
                        model_path=model_version, db_url=db_url, broker_url=redis_url(), device="cpu",
                        study_settle_seconds=0.2, export_backoff_seconds=0.5,
                        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MAMMO_")}, **settings.to_env()}
    processes = Processes(env, tmp_path)
    try:
        node = processes.start("node", "serve", "--no-worker")
        wait_for_port(settings.port, node, "the node", timeout=60)
        wait_for_port(settings.api_port, node, "the node's API", timeout=60)
        processes.start("gpu", "worker", "-Q", "gpu")
        processes.start("io", "worker", "-Q", "io", "-c", "2")

        files = studies[0]
        storescu(settings, files)
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        node_view = type("NodeView", (), {"sessions": session_factory(make_engine(db_url))})
        job, exports = wait_for(lambda: delivered(node_view, study_uid), timeout=240, what="analysis and delivery")
        assert job.state == JobState.DONE, job.error
        assert [e.state for e in exports] == [ExportState.DELIVERED] * 5
        classes = sorted(str(ds.SOPClassUID) for ds in pacs.received())
        assert classes == sorted([SR_CLASS] + [SEG_CLASS] * 4)

        listed = json.loads(_get(f"http://127.0.0.1:{settings.api_port}/api/studies"))
        assert study_uid in json.dumps(listed)
        metrics = _get(f"http://127.0.0.1:{settings.api_port}/metrics").decode()
        assert 'mammo_exports{state="DELIVERED"} 5.0' in metrics
    finally:
        processes.stop()
    # Each queue was served by its own process: analysis on the gpu worker, sending on the io worker.
    analysed, exported = "Task mammo_node.analyze_study[", "Task mammo_node.export_results["
    assert analysed in processes.log("gpu") and exported not in processes.log("gpu")
    assert exported in processes.log("io") and analysed not in processes.log("io")
