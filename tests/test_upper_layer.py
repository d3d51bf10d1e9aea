"""The node's upper layer (``dicom_node.upper_layer``): associations that wait instead of polling, and P-DATA-TF
PDUs read in place, against pynetdicom's own encoder and real sockets."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification

from dicom_node.scp import start_scp
from dicom_node.settings import Settings
from dicom_node.storage import InstanceStore
from dicom_node.upper_layer import (
    MAX_WAIT_SECONDS,
    NodeDUL,
    ReceivedPData,
    adopt,
    split_values,
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


def test_split_values_reads_every_item_and_refuses_impossible_lengths() -> None:
    body = bytearray(struct.pack(">LBB", 4, 1, 3) + b"ab" + struct.pack(">LBB", 3, 5, 2) + b"c")
    values = split_values(body)
    assert [(context, bytes(view)) for context, view in values] == [(1, b"\x03ab"), (5, b"\x02c")]
    assert isinstance(values[0][1], memoryview)  # a view of the one buffer, not a copy
    assert split_values(bytearray(struct.pack(">LB", 1, 1))) is None  # no message control header
    assert split_values(body + struct.pack(">LBB", 9, 1, 2)) is None  # an item running past the PDU
    assert split_values(body + b"\0\0") is None  # trailing bytes that cannot hold an item length
    assert split_values(bytearray()) is None  # a P-DATA-TF PDU holds at least one value


def test_a_c_store_read_in_place_decodes_to_the_bytes_pynetdicom_sent(tmp_path: Path) -> None:
    write_studies(tmp_path, 1, seed=5, rows=128, cols=96, progress=False)
    dataset = pydicom.dcmread(sorted(tmp_path.glob("*/*.dcm"))[0])
    encoded = encode(dataset, False, True)  # as sent in Explicit VR Little Endian
    primitive = C_STORE()
    primitive.MessageID, primitive.Priority = 7, 2
    primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = MG, dataset.SOPInstanceUID
    primitive.DataSet = BytesIO(encoded)
    request = C_STORE_RQ()
    request.primitive_to_message(primitive)
    # Small PDUs, and also every value of the message in a single PDU (allowed by PS3.8 9.3.5): both decode alike.
    bodies = _pdu_bodies(request, 3, 4096)
    assert len(bodies) > 5
    for pdus in (bodies, [b"".join(bodies)]):
        received = DIMSEMessage()
        complete = [received.decode_msg(ReceivedPData(split_values(bytearray(body))).to_primitive())
                    for body in pdus]
        assert complete[-1] and not any(complete[:-1])
        assert received.context_id == 3 and received.command_set.MessageID == 7
        assert received.data_set.getvalue() == encoded


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
    watched = Association(ae, "acceptor")
    watched.bind(evt.EVT_PDU_RECV, lambda event: None)
    assert watches_received_pdus(watched)
    raw = Association(ae, "acceptor")
    raw.bind(evt.EVT_DATA_RECV, lambda event: None)
    assert watches_received_pdus(raw)


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
