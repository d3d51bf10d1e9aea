"""The Storage SCP against real peers: DCMTK storescu/echoscu and a pynetdicom SCU, over localhost."""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, RLELossless
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from dicom_node.scp import start_scp
from dicom_node.settings import Settings
from dicom_node.storage import InstanceStore, instance_path
from tests.conftest import free_port, require_tool
from training.synthetic import write_studies
from worklist.db import make_engine, session_factory
from worklist.models import Instance, Study

MG = "1.2.840.10008.5.1.4.1.1.1.2"


@dataclass
class Node:
    settings: Settings
    sessions: object
    root: Path

    def count(self, model: type = Instance) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(model))


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("send")
    write_studies(root, 1, seed=31, rows=256, cols=160, progress=False)
    return sorted(root.glob("*/*.dcm"))


def _start(db_url: str, tmp_path: Path, **overrides: object) -> tuple[Node, object]:
    settings = Settings(data_dir=tmp_path / "data", port=free_port(), db_url=db_url, **overrides)
    engine = make_engine(settings.database_url())
    sessions = session_factory(engine)
    store = InstanceStore(settings.incoming_dir, sessions)
    server = start_scp(settings, store, settings.server_ssl_context())
    return Node(settings, sessions, settings.incoming_dir), (server, engine)


@pytest.fixture
def node(db_url: str, tmp_path: Path) -> Iterator[Node]:
    running, (server, engine) = _start(db_url, tmp_path)
    yield running
    server.shutdown()
    engine.dispose()


def storescu(node: Node, *files: Path, calling: str = "STORESCU") -> subprocess.CompletedProcess[str]:
    binary = require_tool("/usr/bin/storescu")
    return subprocess.run([binary, "-aet", calling, "-aec", node.settings.ae_title, "127.0.0.1",
                           str(node.settings.port), *map(str, files)], capture_output=True, text=True, timeout=120)


def test_echoscu_verifies_the_node(node: Node) -> None:
    echoscu = require_tool("/usr/bin/echoscu")
    result = subprocess.run([echoscu, "-aec", node.settings.ae_title, "127.0.0.1", str(node.settings.port)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_dcmtk_storescu_study_is_on_disk_and_in_the_db(node: Node, study_files: list[Path]) -> None:
    result = storescu(node, *study_files)
    assert result.returncode == 0, result.stderr
    assert node.count(Instance) == 4 and node.count(Study) == 1
    with node.sessions() as session:
        rows = session.scalars(select(Instance)).all()
    for row in rows:
        stored = pydicom.dcmread(node.root / row.path)
        sent = next(d for d in map(pydicom.dcmread, study_files) if d.SOPInstanceUID == row.sop_instance_uid)
        assert stored.PixelData == sent.PixelData and row.analysable and row.calling_ae == "STORESCU"
        assert {row.laterality + row.view for row in rows} == {"LCC", "RCC", "LMLO", "RMLO"}
    assert not list(node.root.rglob("*.part"))
    # A resend is idempotent: same rows, same paths.
    assert storescu(node, *study_files).returncode == 0
    assert node.count(Instance) == 4


def _send(node: Node, dataset: pydicom.Dataset | Path, calling: str = "PYNETDICOM") -> int:
    """C-STORE a dataset, or a file's bytes exactly as they are (pynetdicom sends a path without decoding it)."""
    header = pydicom.dcmread(dataset, stop_before_pixels=True) if isinstance(dataset, Path) else dataset
    ae = AE(ae_title=calling)
    ae.add_requested_context(header.SOPClassUID, header.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.settings.port, ae_title=node.settings.ae_title)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(dataset).Status)
    finally:
        assoc.release()


def _truncated(path: Path, folder: Path) -> Path:
    broken = folder / "truncated.dcm"
    broken.write_bytes(path.read_bytes()[:-5000])  # a transfer cut short: the pixel data ends early
    return broken


def _unknown_vr(path: Path, folder: Path) -> Path:
    data = path.read_bytes()
    rows = data.index(b"\x28\x00\x10\x00US")  # (0028,0010) Rows in explicit VR little endian
    broken = folder / "unknown_vr.dcm"
    broken.write_bytes(data[:rows + 4] + b"ZZ" + data[rows + 6:])
    return broken


def _truncated_jpeg2000(path: Path, folder: Path) -> Path:
    dataset = pydicom.dcmread(path)
    dataset.compress(JPEG2000Lossless, generate_instance_uid=False)
    (frame,) = generate_frames(dataset.PixelData, number_of_frames=1)
    dataset.PixelData = encapsulate([frame[: len(frame) // 2]])  # the codestream loses its end
    broken = folder / "truncated_j2k.dcm"
    dataset.save_as(broken)
    return broken


@pytest.mark.parametrize("breaking", [_truncated, _unknown_vr, _truncated_jpeg2000])
def test_a_malformed_instance_is_refused_and_the_node_keeps_serving(
        node: Node, study_files: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        breaking: Callable[[Path, Path], Path]) -> None:
    broken = breaking(study_files[0], tmp_path)
    with caplog.at_level(logging.WARNING, logger="dicom_node.scp"):
        assert _send(node, broken) == 0xC000
    assert node.count(Instance) == 0 and not list(node.root.rglob("*.dcm"))
    uid = pydicom.dcmread(study_files[0], stop_before_pixels=True).SOPInstanceUID
    (line,) = [r.getMessage() for r in caplog.records if "refused instance" in r.getMessage()]
    assert uid in line and ("does not decode" in line or "pixel data" in line)
    assert _send(node, study_files[1]) == 0x0000  # the next association is served
    assert node.count(Instance) == 1


def test_path_traversal_uid_is_refused_and_never_becomes_a_path(node: Node, study_files: list[Path]) -> None:
    dataset = pydicom.dcmread(study_files[0])
    dataset.SeriesInstanceUID = "../../../../tmp/evil"
    assert _send(node, dataset) == 0xC000  # refused by the node's own check (pydicom's read warnings are off)
    assert node.count(Instance) == 0
    assert not list(node.root.parent.rglob("evil*")) and not Path("/tmp/evil").exists()
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        instance_path(node.root, "1.2", "../x", "1.3")
    # the node keeps serving the next association
    assert _send(node, pydicom.dcmread(study_files[1])) == 0x0000


def test_rle_compressed_mammogram_is_stored_as_received(node: Node, study_files: list[Path]) -> None:
    dataset = pydicom.dcmread(study_files[0])
    dataset.compress(RLELossless)
    assert _send(node, dataset) == 0x0000
    with node.sessions() as session:
        row = session.scalars(select(Instance)).one()
    assert row.transfer_syntax_uid == RLELossless
    assert pydicom.dcmread(node.root / row.path).file_meta.TransferSyntaxUID == RLELossless


def test_non_mammography_is_refused_by_configuration(db_url: str, tmp_path: Path, study_files: list[Path]) -> None:
    running, (server, engine) = _start(db_url, tmp_path, store_non_mammography=False)
    try:
        dataset = pydicom.dcmread(study_files[0])
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        dataset.Modality = "OT"
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", running.settings.port, ae_title=running.settings.ae_title)
        # the context itself is not offered: pynetdicom refuses to send, nothing is stored
        assert not assoc.is_established or not assoc.accepted_contexts
        if assoc.is_established:
            assoc.release()
        assert running.count(Instance) == 0
    finally:
        server.shutdown()
        engine.dispose()


@pytest.mark.parametrize(("sop_class", "modality"), [("1.2.840.10008.5.1.4.1.1.7", "OT"),
                                                      ("1.2.840.10008.5.1.4.1.1.1.2.1", "MG")])  # For Processing
def test_non_mammography_and_raw_mammograms_are_stored_but_not_analysed(node: Node, study_files: list[Path],
                                                                        sop_class: str, modality: str) -> None:
    dataset = pydicom.dcmread(study_files[0])
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = sop_class
    dataset.Modality = modality
    assert _send(node, dataset) == 0x0000
    with node.sessions() as session:
        assert session.scalars(select(Instance)).one().analysable is False


def test_unknown_calling_ae_is_rejected_and_logged(db_url: str, tmp_path: Path, study_files: list[Path],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    running, (server, engine) = _start(db_url, tmp_path, allowed_calling_aes=["MODALITY1"])
    try:
        with caplog.at_level(logging.WARNING, logger="dicom_node.scp"):
            refused = storescu(running, study_files[0], calling="INTRUDER")
        assert refused.returncode != 0
        assert running.count(Instance) == 0
        assert any("INTRUDER" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in caplog.records)
        assert storescu(running, study_files[0], calling="MODALITY1").returncode == 0
        assert running.count(Instance) == 1
    finally:
        server.shutdown()
        engine.dispose()


def test_database_failure_returns_out_of_resources(tmp_path: Path, study_files: list[Path]) -> None:
    """A DB that cannot take the row gets 0xA700, never a Success for an unrecorded instance."""
    settings = Settings(data_dir=tmp_path / "data", port=free_port())
    engine = make_engine(f"sqlite:///{tmp_path / 'not-migrated.sqlite'}")  # no tables: every insert fails
    server = start_scp(settings, InstanceStore(settings.incoming_dir, session_factory(engine)))
    try:
        node = Node(settings, session_factory(engine), settings.incoming_dir)
        assert _send(node, pydicom.dcmread(study_files[0])) == 0xA700
    finally:
        server.shutdown()
        engine.dispose()


@pytest.mark.parametrize("failing", ["dicom_node.scp.decode_received", "dicom_node.storage.InstanceStore.store"])
def test_running_out_of_memory_is_out_of_resources(node: Node, study_files: list[Path], failing: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No memory to decode or store an instance is the node's shortage: 0xA700 (the sender retries), never
    0xC000 (which tells it the instance is bad); the next instance is stored once memory is back."""
    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError

    with monkeypatch.context() as patched:
        patched.setattr(failing, out_of_memory)
        assert _send(node, study_files[0]) == 0xA700
    assert node.count(Instance) == 0
    assert _send(node, study_files[0]) == 0x0000
    assert node.count(Instance) == 1


@pytest.mark.parametrize(("failing", "status"), [
    ("dicom_node.storage.stage_file", 0xA700),  # the node's own failure: retry later
    ("dicom_node.storage.view_of", 0xC000),  # reading the sender's values: its instance is refused
])
def test_an_unexpected_error_is_the_nodes_unless_it_reads_the_dataset(node: Node, study_files: list[Path],
                                                                      failing: str, status: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An error while storing a valid dataset (a node shutting down: no new futures) is not the sender's fault:
    0xA700, which it retries; 0xC000 would tell it to drop the instance for good."""
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    with monkeypatch.context() as patched:
        patched.setattr(failing, broken)
        assert _send(node, study_files[0]) == status
    assert node.count(Instance) == 0
    assert _send(node, study_files[0]) == 0x0000


def _certificates(folder: Path, names: tuple[str, ...] = ("server", "client")) -> dict[str, Path]:
    """A CA, and a certificate it signed for each name (openssl, RSA 2048, two days): ``<name>.crt``, ``.key``."""
    openssl = require_tool("/usr/bin/openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=mammo-test-ca")
    for name in names:
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext")
    return {"ca.crt": folder / "ca.crt", **{f"{name}.{kind}": folder / f"{name}.{kind}"
                                            for name in names for kind in ("crt", "key")}}


def test_mutual_tls_with_dcmtk_and_our_scu(db_url: str, tmp_path: Path, study_files: list[Path]) -> None:
    from dicom_node.scu import SendError, send_files
    from dicom_node.settings import Destination

    storescu = require_tool("/usr/bin/storescu")
    certs = _certificates(tmp_path)
    running, (server, engine) = _start(db_url, tmp_path, tls_certificate=certs["server.crt"],
                                       tls_private_key=certs["server.key"], tls_ca_certificates=certs["ca.crt"])
    port = str(running.settings.port)
    silent = socket.create_connection(("127.0.0.1", int(port)))  # connects, never says hello: others still get in
    try:
        plain = subprocess.run([storescu, "-aec", "MAMMO_AI", "127.0.0.1", port, str(study_files[0])],
                               capture_output=True, text=True, timeout=60)
        anonymous = subprocess.run([storescu, "+tla", "+cf", str(certs["ca.crt"]), "-aec", "MAMMO_AI",
                                    "127.0.0.1", port, str(study_files[0])], capture_output=True, text=True,
                                   timeout=60)
        assert plain.returncode != 0 and anonymous.returncode != 0  # no TLS / no client certificate: refused
        assert running.count() == 0
        mutual = subprocess.run([storescu, "+tls", str(certs["client.key"]), str(certs["client.crt"]), "+cf",
                                 str(certs["ca.crt"]), "-aec", "MAMMO_AI", "127.0.0.1", port,
                                 *map(str, study_files[:2])], capture_output=True, text=True, timeout=60)
        assert mutual.returncode == 0, mutual.stderr
        client = Settings(tls_certificate=certs["client.crt"], tls_private_key=certs["client.key"],
                          tls_ca_certificates=certs["ca.crt"])
        peer = Destination(name="node", ae_title="MAMMO_AI", host="127.0.0.1", port=int(port), tls=True)
        outcomes = send_files(peer, study_files[2:], "MODALITY", ssl_context=client.client_ssl_context(peer))
        assert [o.stored for o in outcomes] == [True, True]
        assert running.count() == 4
        impostor = peer.model_copy(update={"tls_server_name": "pacs.example.org"})  # not a name the cert holds
        with pytest.raises(SendError):
            send_files(impostor, study_files[:1], "MODALITY", ssl_context=client.client_ssl_context(impostor))
    finally:
        silent.close()
        server.shutdown()
        engine.dispose()


def test_a_certificate_renewed_in_place_is_served_to_new_connections(db_url: str, tmp_path: Path) -> None:
    """The SCP reads its certificate files again when they change, without a restart; a renewal not yet
    loadable (its key half written) keeps the certificate before."""
    certs = _certificates(tmp_path, ("server", "client", "renewed"))
    running, (server, engine) = _start(db_url, tmp_path, tls_certificate=certs["server.crt"],
                                       tls_private_key=certs["server.key"], tls_ca_certificates=certs["ca.crt"])

    def served_name() -> str:
        context = ssl.create_default_context(cafile=str(certs["ca.crt"]))
        context.load_cert_chain(certs["client.crt"], certs["client.key"])
        with socket.create_connection(("127.0.0.1", running.settings.port), timeout=30) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return dict(item[0] for item in tls.getpeercert()["subject"])["commonName"]

    try:
        assert served_name() == "server"
        shutil.copy(certs["renewed.key"], certs["server.key"])
        shutil.copy(certs["renewed.crt"], certs["server.crt"])
        assert served_name() == "renewed"
        certs["server.key"].write_text("-----BEGIN PRIVATE KEY-----\n")  # the next renewal, half written
        assert served_name() == "renewed"
    finally:
        server.shutdown()
        engine.dispose()


def test_a_message_larger_than_the_node_takes_aborts_its_association_and_the_node_keeps_serving(
        db_url: str, tmp_path: Path, study_files: list[Path]) -> None:
    running, (server, engine) = _start(db_url, tmp_path, maximum_message_mb=1)
    large = pydicom.dcmread(study_files[0])
    large.Rows, large.Columns = 1024, 832
    large.PixelData = bytes(1024 * 832 * 2)  # 1.7 MB: more than the 1 MiB the node takes
    large.SOPInstanceUID = large.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    large.save_as(tmp_path / "large.dcm", enforce_file_format=True)
    try:
        refused = storescu(running, tmp_path / "large.dcm")
        assert refused.returncode != 0 and running.count() == 0
        assert storescu(running, study_files[0]).returncode == 0 and running.count() == 1
    finally:
        server.shutdown()
        engine.dispose()


def test_a_pdu_longer_than_announced_aborts_its_association_and_the_node_keeps_serving(
        node: Node, study_files: list[Path]) -> None:
    ae = AE(ae_title="OVERSIZE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.settings.port, ae_title=node.settings.ae_title)
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == node.settings.maximum_pdu_size == 1 << 20
    # a P-DATA-TF PDU declaring 2 GiB: the node must stop reading it at once, not buffer what follows
    assoc.dul.socket.socket.sendall(b"\x04\x00" + struct.pack(">L", 1 << 31) + bytes(65536))
    deadline = time.monotonic() + 30
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted or not assoc.is_established
    assert storescu(node, study_files[0]).returncode == 0
    assert node.count() == 1
