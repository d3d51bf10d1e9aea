"""The node's upper layer (``dicom_node.upper_layer``): associations that wait instead of polling, and P-DATA-TF
PDUs read value by value, data set fragments straight into their spool, against pynetdicom's own encoder and
real sockets."""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, NamedTuple

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification

from dicom_node import dataset_spool
from dicom_node.dataset_spool import file_header
from dicom_node.durable_files import AlignedMemoryPool
from dicom_node.scp import start_scp
from dicom_node.settings import Settings
from dicom_node.storage import InstanceStore
from dicom_node.upper_layer import (
    MAX_WAIT_SECONDS,
    STANDARD_LOG_HANDLERS,
    NodeDUL,
    adopt,
    c_store_response,
    watches_received_pdus,
)
from tests.conftest import free_port, wait_for
from training.synthetic import write_studies
from worklist.db import make_engine, session_factory

MG = "1.2.840.10008.5.1.4.1.1.1.2"


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[Any]:
    settings = Settings(data_dir=tmp_path / "data", port=free_port(), db_url=db_url, maximum_pdu_size=65536)
    engine = make_engine(settings.database_url())
    running = start_scp(settings, InstanceStore(settings.incoming_dir, session_factory(engine)))
    running.settings = settings
    yield running
    running.shutdown()
    engine.dispose()


def _associate(server: Any, *contexts: str) -> Association:
    ae = AE(ae_title="UPPERLAYER")
    for context in contexts or (Verification,):
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", server.settings.port, ae_title=server.settings.ae_title)
    assert assoc.is_established
    return assoc


def _counting(calls: list[int], method: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return method(*args, **kwargs)
    return counted


def _pdu_bodies(message: DIMSEMessage, context_id: int, max_pdu: int) -> list[bytes]:
    """The bodies (after the 6-byte header) of the P-DATA-TF PDUs pynetdicom sends for ``message``."""
    bodies = []
    for primitive in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        bodies.append(pdu.encode()[6:])
    return bodies


def _pdu(body: bytes) -> bytes:
    return b"\x04\x00" + struct.pack(">L", len(body)) + body


def _c_store_request(dataset: pydicom.Dataset, encoded: bytes) -> C_STORE_RQ:
    primitive = C_STORE()
    primitive.MessageID, primitive.Priority = 7, 2
    primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = MG, dataset.SOPInstanceUID
    primitive.DataSet = BytesIO(encoded)
    request = C_STORE_RQ()
    request.primitive_to_message(primitive)
    return request


class _CStore(NamedTuple):
    """An association to the server and a C-STORE of a small synthetic image cut into 4 KiB P-DATA-TF PDUs."""

    assoc: Association
    dataset: pydicom.Dataset
    context: Any
    encoded: bytes
    bodies: list[bytes]


def _c_store_in_pdus(server: Any, folder: Path, seed: int) -> _CStore:
    """The PDU bodies are those pynetdicom would send for the image under the context the server accepted."""
    write_studies(folder, 1, seed=seed, rows=128, cols=96, progress=False)
    dataset = pydicom.dcmread(sorted(folder.glob("*/*.dcm"))[0])
    assoc = _associate(server, MG)
    context = assoc.accepted_contexts[0]
    syntax = context.transfer_syntax[0]
    encoded = encode(dataset, syntax.is_implicit_VR, syntax.is_little_endian)
    return _CStore(assoc, dataset, context, encoded,
                   _pdu_bodies(_c_store_request(dataset, encoded), context.context_id, 4096))


def _stored(server: Any, sop_instance_uid: str) -> Path:
    wait_for(lambda: any(server.settings.incoming_dir.rglob(f"{sop_instance_uid}.dcm")), "the instance to be stored")
    return next(server.settings.incoming_dir.rglob(f"{sop_instance_uid}.dcm"))


@pytest.mark.parametrize("layout", ["one PDU per value", "every value in one PDU"])
def test_a_c_store_read_value_by_value_is_stored_as_pynetdicom_sent_it(server: Any, tmp_path: Path,
                                                                      layout: str) -> None:
    """Small PDUs (4 KiB, each data set fragment read with the next PDU's headers), and every value of the
    message in a single PDU (allowed by PS3.8 9.3.5, read value by value): the file holds exactly what was
    sent, after the file meta information pynetdicom would have written."""
    store = _c_store_in_pdus(server, tmp_path, seed=5)
    try:
        assert len(store.bodies) > 5
        raw = b"".join(map(_pdu, store.bodies)) if layout == "one PDU per value" else _pdu(b"".join(store.bodies))
        store.assoc.dul.socket.socket.sendall(raw)
        stored = _stored(server, store.dataset.SOPInstanceUID).read_bytes()
    finally:
        store.assoc.release()
    syntax = store.context.transfer_syntax[0]
    assert stored == file_header(MG, store.dataset.SOPInstanceUID, syntax) + store.encoded


def test_large_instances_in_pdus_of_the_announced_size_are_stored_whole(server: Any, tmp_path: Path) -> None:
    write_studies(tmp_path, 1, seed=8, rows=1024, cols=832, progress=False)  # 1.7 MB each: 27 PDUs of 64 KiB
    sources = sorted(tmp_path.glob("*/*.dcm"))
    assoc = _associate(server, MG)
    try:
        assert [assoc.send_c_store(path).Status for path in sources] == [0x0000] * len(sources)
    finally:
        assoc.release()
    for path in sources:
        sent = pydicom.dcmread(path)
        assert pydicom.dcmread(_stored(server, sent.SOPInstanceUID)).PixelData == sent.PixelData


def test_an_abort_after_a_fragment_is_read_at_once_and_nothing_is_stored(server: Any, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The fragment's read takes the next PDU's headers along: a 10-byte A-ABORT there is put back and handled.
    The unfinished data set's map goes back to the pool."""
    pool = AlignedMemoryPool(1 << 20, 2, reserve_only=True)
    monkeypatch.setattr(dataset_spool, "_MAPS", pool)
    assoc, *_, bodies = _c_store_in_pdus(server, tmp_path, seed=9)
    wait_for(lambda: len(server.active_associations) == 1, "the association to be served")
    start = time.monotonic()
    assoc.dul.socket.socket.sendall(b"".join(map(_pdu, bodies[:3])) + b"\x07\x00" + struct.pack(">L", 4) + bytes(4))
    wait_for(lambda: not server.active_associations, "the association to end", timeout=10)
    assert time.monotonic() - start < 5  # not held until a timeout
    assoc.abort()
    assert not list(server.settings.incoming_dir.rglob("*.dcm"))
    assert len(pool._idle) == 1
    second = _associate(server)
    try:
        assert second.send_c_echo().Status == 0x0000
    finally:
        second.release()


def test_an_invalid_pdu_within_a_message_ends_the_association_at_once(server: Any, tmp_path: Path) -> None:
    """An item longer than its PDU, sent mid-message by a peer that keeps its socket open: the rest of the PDU is
    read, the node aborts, and (no longer reading without a poll outside Sta6) closes without waiting for the
    receive timeout."""
    assoc, _, context, _, bodies = _c_store_in_pdus(server, tmp_path, seed=12)
    try:
        wait_for(lambda: len(server.active_associations) == 1, "the association to be served")
        assoc.dul.kill_dul()  # the peer keeps its socket open but no longer reads: only the node can close it
        assoc.dul.join(5)
        start = time.monotonic()
        bad = struct.pack(">LBB", 100, context.context_id, 0) + b"ab"  # one item claiming 100 of the PDU's 8 bytes
        assoc.dul.socket.socket.sendall(b"".join(map(_pdu, bodies[:3])) + _pdu(bad))
        wait_for(lambda: not server.active_associations, "the association to end", timeout=30)
        assert time.monotonic() - start < 10  # not the 60 s receive timeout
    finally:
        assoc.abort()
    assert not list(server.settings.incoming_dir.rglob("*.dcm"))


def test_a_c_store_response_larger_than_the_peers_pdus_goes_through_pynetdicom(monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    assoc = Association(AE(), "acceptor")
    adopt(assoc)
    assoc.dul.wakeup.close()
    fallback, sent = [], []
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", lambda self, primitive, context_id: fallback.append(1))
    assoc.dul.send_pdu = sent.append
    response = C_STORE()
    response.MessageIDBeingRespondedTo, response.Status = 1, 0x0000
    response.AffectedSOPClassUID, response.AffectedSOPInstanceUID = MG, "1.2.3.4"
    for maximum in (0, 16384, 64):  # 0: no limit
        assoc.requestor.maximum_length = maximum
        assoc.dimse.send_msg(response, 1)
    assert len(sent) == 2 and fallback == [1]


def test_a_peer_that_stalls_within_a_message_is_cut_off(server: Any, tmp_path: Path) -> None:
    """Within a message the DUL reads without waiting for data first; the socket's receive timeout (the AE's
    network timeout) ends an association whose peer stops sending."""
    server.ae.network_timeout = 1
    assoc, *_, bodies = _c_store_in_pdus(server, tmp_path, seed=10)
    try:
        wait_for(lambda: len(server.active_associations) == 1, "the association to be served")
        assoc.dul.socket.socket.sendall(b"".join(map(_pdu, bodies[:3])))
        wait_for(lambda: not server.active_associations, "the stalled association to end", timeout=15)
    finally:
        assoc.abort()
    assert not list(server.settings.incoming_dir.rglob("*.dcm"))


def test_an_idle_association_waits_and_still_answers_at_once(server: Any) -> None:
    assoc = _associate(server)
    try:
        wait_for(lambda: len(server.active_associations) == 1, "the association to be served")
        (served,) = server.active_associations
        assert isinstance(served.dul, NodeDUL)
        reactor_loops, dul_loops = [0], [0]
        served.dimse.get_msg = _counting(reactor_loops, served.dimse.get_msg)
        served.dul._process_recv_primitive = _counting(dul_loops, served.dul._process_recv_primitive)
        time.sleep(1.0)
        # pynetdicom's own loops run ~1,000 times a second each; waiting, they run ~10 times (at most 100 ms).
        assert 0 < reactor_loops[0] < 100 and 0 < dul_loops[0] < 100, (reactor_loops, dul_loops)
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert assoc.is_released
    wait_for(lambda: not server.active_associations, "the association to end")


def test_impossible_item_lengths_abort_the_association_and_the_node_keeps_serving(server: Any) -> None:
    assoc = _associate(server)
    body = struct.pack(">LBB", 100, 1, 3) + b"ab"  # a P-DATA-TF PDU of 8 bytes whose one item claims 100
    assoc.dul.socket.socket.sendall(b"\x04\x00" + struct.pack(">L", len(body)) + body)
    wait_for(lambda: not assoc.is_established, "the abort")
    assert assoc.is_aborted
    second = _associate(server)
    try:
        assert second.send_c_echo().Status == 0x0000
    finally:
        second.release()


def test_a_handler_watching_received_pdus_keeps_pynetdicoms_decoding() -> None:
    ae = AE()
    assert not watches_received_pdus(Association(ae, "acceptor"))  # only pynetdicom's standard log handler
    for event in (evt.EVT_PDU_RECV, evt.EVT_DATA_RECV, evt.EVT_FSM_TRANSITION):
        watched = Association(ae, "acceptor")
        watched.bind(event, lambda event: None)
        assert watches_received_pdus(watched), event


@pytest.mark.parametrize(("level", "bound"), [(logging.WARNING, False), (logging.INFO, True)])
def test_pynetdicoms_log_handlers_are_unbound_while_its_log_drops_them(level: int, bound: bool) -> None:
    logger = logging.getLogger("pynetdicom")
    before = logger.level
    logger.setLevel(level)
    try:
        assoc = Association(AE(), "acceptor")
        adopt(assoc)
        assoc.dul.wakeup.close()
    finally:
        logger.setLevel(before)
    assert [handler in [bound_handler for bound_handler, *_ in assoc.get_handlers(event)]
            for event, handler in STANDARD_LOG_HANDLERS] == [bound] * len(STANDARD_LOG_HANDLERS)


def test_a_handler_bound_during_an_association_sees_its_next_p_data_pdus(server: Any, tmp_path: Path) -> None:
    write_studies(tmp_path, 1, seed=6, rows=128, cols=96, progress=False)
    first, second = (pydicom.dcmread(path) for path in sorted(tmp_path.glob("*/*.dcm"))[:2])
    assoc = _associate(server, MG)
    try:
        assert assoc.send_c_store(first).Status == 0x0000  # read in place: nothing watches
        seen: list[int] = []
        server.bind(evt.EVT_PDU_RECV, lambda event: seen.append(event.pdu.pdu_type))
        assert assoc.send_c_store(second).Status == 0x0000
        assert seen.count(0x04) >= 2  # its P-DATA-TF PDUs (the dataset spans several of 64 KiB)
    finally:
        assoc.release()
    assert {path.name for path in server.settings.incoming_dir.rglob("*.dcm")} == {
        f"{first.SOPInstanceUID}.dcm", f"{second.SOPInstanceUID}.dcm"}


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3", "1.2.826.0.1.3680043.8.498.12345678901234567890"])
@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC000])
def test_a_c_store_response_is_encoded_as_pynetdicom_would(sop_instance_uid: str, status: int) -> None:
    response = C_STORE()
    response.MessageIDBeingRespondedTo, response.Status = 65535, status
    response.AffectedSOPClassUID, response.AffectedSOPInstanceUID = MG, sop_instance_uid
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    (sent,) = message.encode_msg(1, 16384)
    assert sent.presentation_data_value_list == [(1, b"\x03" + c_store_response(response))]


def test_a_handler_watching_sent_messages_sees_the_c_store_response(server: Any, tmp_path: Path) -> None:
    write_studies(tmp_path, 1, seed=11, rows=128, cols=96, progress=False)
    first, second = (pydicom.dcmread(path) for path in sorted(tmp_path.glob("*/*.dcm"))[:2])
    sent: list[str] = []
    assoc = _associate(server, MG)
    try:
        assert assoc.send_c_store(first).Status == 0x0000  # encoded by the node
        server.bind(evt.EVT_DIMSE_SENT, lambda event: sent.append(type(event.message).__name__))
        assert assoc.send_c_store(second).Status == 0x0000  # by pynetdicom, for the handler
    finally:
        assoc.release()
    assert sent == ["C_STORE_RSP"]


def test_the_dul_waits_no_longer_than_a_running_artim_timer() -> None:
    assoc = Association(AE(), "acceptor")
    adopt(assoc)
    try:
        dul = assoc.dul
        assert dul.wait_timeout() == MAX_WAIT_SECONDS  # not started
        dul.artim_timer.timeout = 0.05
        dul.artim_timer.start()
        assert 0 <= dul.wait_timeout() <= 0.05
        dul.artim_timer.stop()  # stopped (pynetdicom keeps its start time): no longer a deadline
        assert dul.wait_timeout() == MAX_WAIT_SECONDS
    finally:
        assoc.dul.wakeup.close()
