"""The Storage SCP in several processes sharing its port (``scp_processes`` > 1) with real DCMTK peers: every
instance stored once, the work spread over the processes, the allow-list, TLS and C-FIND in the children, a
killed child restarted, and nothing left running after ``stop()``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from prometheus_client import REGISTRY
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.node import Node
from dicom_node.scp_pool import ScpPool, require_free_port
from dicom_node.settings import Settings
from tests.conftest import free_port, require_tool, wait_for
from tests.test_scp import _certificates
from training.synthetic import write_studies
from worklist.db import make_engine, upgrade
from worklist.models import Instance

SENDER = "MODALITY"
PENDING = 0xFF00


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("send")
    write_studies(root, 4, seed=41, rows=256, cols=160, progress=False)
    return sorted(root.glob("*/*.dcm"))


def pool_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Two SCP processes, JSON logs (with the pid of each line), a migrated SQLite database."""
    settings = Settings(data_dir=tmp_path / "data", port=free_port(), scp_processes=2, log_format="json",
                        allowed_calling_aes=[SENDER], **overrides)
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.database_url())
    upgrade(engine)
    engine.dispose()
    return settings


@contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Processes started inside write their stderr (an SCP process: its log) to ``path``."""
    saved = os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A node with two SCP processes and no worker; the SCP processes log to ``tmp_path / "scp.log"``."""
    with stderr_to(tmp_path / "scp.log"):
        running = Node(pool_settings(tmp_path), embedded_worker=False).start()
    try:
        yield running
    finally:
        running.stop()


def storescu(settings: Settings, files: list[Path], calling: str = SENDER,
             *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen([require_tool("/usr/bin/storescu"), *options, "-aet", calling, "-aec", settings.ae_title,
                             "127.0.0.1", str(settings.port), *map(str, files)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def send_concurrently(settings: Settings, files: list[Path], associations: int = 8) -> None:
    senders = [storescu(settings, files[index::associations]) for index in range(associations)]
    for sender in senders:
        error = sender.communicate(timeout=180)[1]
        assert sender.returncode == 0, error


def echo(settings: Settings) -> bool:
    return subprocess.run([require_tool("/usr/bin/echoscu"), "-aet", SENDER, "-aec", settings.ae_title, "127.0.0.1",
                           str(settings.port)], capture_output=True, timeout=60).returncode == 0


def logged(node: Node, starting: str) -> list[dict]:
    """The JSON log lines of the SCP processes whose message starts with ``starting``."""
    lines = (node.settings.data_dir.parent / "scp.log").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry["message"].startswith(starting)]


def count(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Instance))


def scp_total(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"mammo_scp_{name}_total", labels) or 0.0


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting to be)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def scp_children() -> list[int]:
    """Live SCP child processes of this process."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if parent == os.getpid() and b"dicom_node.scp_pool" in command and not gone(int(stat.parent.name)):
            found.append(int(stat.parent.name))
    return found


def test_eight_associations_store_each_instance_once_over_both_processes(node: Node,
                                                                        study_files: list[Path]) -> None:
    stored_before, accepted_before = scp_total("instances_stored", analysable="true"), scp_total(
        "associations", outcome="accepted")
    lines: list[dict] = []
    rounds = 0
    while rounds < 4 and len({line["pid"] for line in lines}) < 2:  # the kernel hashes connections: all 8
        send_concurrently(node.settings, study_files)                # land in one process once in 128 rounds
        lines = logged(node, "stored instance")
        rounds += 1
    sent = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in study_files}
    first_stores = [line["message"].split()[2] for line in lines if "resend" not in line["message"]]
    assert sorted(first_stores) == sorted(sent)  # each instance recorded once, by one process
    assert len(lines) == rounds * len(study_files)
    assert {line["pid"] for line in lines} <= set(node.server.pids()) and len({line["pid"] for line in lines}) == 2
    assert count(node.sessions) == len(sent)
    with node.sessions() as session:
        paths = {node.settings.incoming_dir / path for path in session.scalars(select(Instance.path))}
    assert set(node.settings.incoming_dir.rglob("*.dcm")) == paths and len(paths) == len(sent)
    assert not list(node.settings.incoming_dir.rglob("*.part"))
    # /metrics (the default registry) serves the sums over the children
    assert scp_total("instances_stored", analysable="true") - stored_before == len(lines)
    assert scp_total("associations", outcome="accepted") - accepted_before == 8 * rounds


def test_allow_list_c_find_and_echo_in_the_children(node: Node, study_files: list[Path]) -> None:
    rejected_before = scp_total("associations", outcome="rejected")
    refused = storescu(node.settings, study_files[:1], "INTRUDER")
    assert refused.wait(60) != 0 and count(node.sessions) == 0
    # pynetdicom runs the rejection handler after it sent the A-ASSOCIATE-RJ
    wait_for(lambda: scp_total("associations", outcome="rejected") == rejected_before + 1, "the rejection count")
    rejected = logged(node, "association rejected: calling AE 'INTRUDER'")
    assert len(rejected) == 1 and rejected[0]["pid"] in node.server.pids()
    assert echo(node.settings)
    send_concurrently(node.settings, study_files[:4], associations=4)
    ae = AE(ae_title=SENDER)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.settings.port, ae_title=node.settings.ae_title)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ""
    try:
        responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        found = [identifier for status, identifier in responses if status.Status == PENDING]
    finally:
        assoc.release()
    assert len(found) == 1  # the first four files are one study


def test_a_killed_scp_process_is_replaced_and_stop_leaves_no_child(tmp_path: Path, study_files: list[Path]) -> None:
    node = Node(pool_settings(tmp_path), embedded_worker=False).start()
    try:
        pool = node.server
        first = pool.pids()
        assert sorted(scp_children()) == sorted(first)
        send_concurrently(node.settings, study_files[:4], associations=4)
        stored = scp_total("instances_stored", analysable="true")
        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: gone(first[0]), "the killed SCP process to exit")
        assert echo(node.settings)  # the other process answers meanwhile
        wait_for(lambda: first[0] not in pool.pids(), "the SCP process to be restarted")
        pool.wait_ready(60)
        assert len(set(pool.pids()) - set(first)) == 1
        os.kill(first[1], signal.SIGKILL)  # now only the replacement listens, until the next restart
        wait_for(lambda: gone(first[1]), "the second SCP process to exit")
        assert echo(node.settings)
        send_concurrently(node.settings, study_files[4:8], associations=4)
        assert count(node.sessions) == 8
        assert scp_total("instances_stored", analysable="true") == stored + 4  # a dead child's counts are kept
        every = {*first, *pool.pids()}
    finally:
        node.stop()
    assert all(gone(pid) for pid in every) and scp_children() == []


def test_scp_processes_stop_by_themselves_when_the_node_process_dies(tmp_path: Path) -> None:
    """No orphan keeps the port: a restarted node would share it with them (SO_REUSEPORT)."""
    settings = pool_settings(tmp_path)
    script = ("import time; from dicom_node.scp_pool import ScpPool; from dicom_node.settings import Settings; "
              "print(*ScpPool(Settings()).start().pids(), flush=True); time.sleep(300)")
    parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, **settings.to_env()},
                              stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in parent.stdout.readline().split()]
    parent.kill()
    parent.wait()
    assert len(pids) == 2
    wait_for(lambda: all(map(gone, pids)), "the orphaned SCP processes to stop", timeout=30)
    require_free_port("127.0.0.1", settings.port)


def test_mutual_tls_in_the_children(tmp_path: Path, study_files: list[Path]) -> None:
    certs = _certificates(tmp_path)
    settings = pool_settings(tmp_path, tls_certificate=certs["server.crt"], tls_private_key=certs["server.key"],
                             tls_ca_certificates=certs["ca.crt"])
    pool = ScpPool(settings).start()
    try:
        plain = storescu(settings, study_files[:1])
        assert plain.wait(60) != 0
        senders = [storescu(settings, [path], SENDER, "+tls", str(certs["client.key"]), str(certs["client.crt"]),
                            "+cf", str(certs["ca.crt"])) for path in study_files[:4]]
        for sender in senders:
            error = sender.communicate(timeout=120)[1]
            assert sender.returncode == 0, error
    finally:
        pool.shutdown()
    engine = make_engine(settings.database_url())
    try:
        with engine.connect() as connection:
            assert connection.scalar(select(func.count()).select_from(Instance)) == 4
    finally:
        engine.dispose()


def test_a_taken_port_is_refused_even_to_a_reuse_port_listener(tmp_path: Path) -> None:
    """A stale node's SO_REUSEPORT socket would otherwise let the children join its port silently."""
    settings = pool_settings(tmp_path)
    with socket.socket() as stale:
        stale.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stale.bind(("127.0.0.1", settings.port))
        stale.listen()
        with pytest.raises(OSError):
            ScpPool(settings).start()
    assert scp_children() == []
