"""The DICOM upper layer of the node's acceptor associations: pynetdicom's state machine, without its polling and
without copying each received P-DATA-TF PDU five times.

**Waiting, not polling.** pynetdicom runs two threads per association, and both poll: the DUL thread checks its
socket and its send queue and sleeps 1 ms when neither has anything; the association thread sleeps 1 ms, then
checks for a decoded DIMSE message, a release or abort, and the timers. That is ~2,000 wake-ups a second per
association, each taking the interpreter lock: eight idle associations kept 60% of a core busy. Here:

- the DUL thread blocks in ``poll`` on its socket and a wake-up pipe (``DulWakeup``), written when a primitive
  is queued to be sent and when the thread is told to stop (``BoundedSocket.ready`` does the waiting);
- the association thread waits on an ``Event`` set when a DIMSE message is complete, when the DUL queues a
  release or abort for it, and when the DUL thread ends (``NodeDIMSE.get_msg``).

Both waits last at most ``MAX_WAIT_SECONDS``, after which the loops make their usual checks (ARTIM and idle
timers, a kill flag set without a wake-up): a missed wake-up costs latency, never a message.

**P-DATA-TF read in place.** pynetdicom copies a received P-DATA-TF PDU into a new ``bytearray``, then into
``bytes``, slices each presentation data value out of it and then its message control header off it, before
the DIMSE layer appends the fragment to its ``BytesIO``: five copies of every byte of a 7 MB mammogram, in
fresh memory, under the interpreter lock. ``NodeDUL`` reads such a PDU, when it is the next event of an
established association (Sta6), into one buffer and hands the DIMSE layer views of it, checked against the
item lengths: the fragment is copied once, into the message. Every other PDU, and every P-DATA-TF PDU while a
handler of the node or a debug log watches received PDUs (asked before each PDU, ~1 µs), takes pynetdicom's
own path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom._handlers import standard_pdu_recv_handler
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 0.1
P_DATA_TF_TYPE = 0x04
PDU_HEADER = struct.Struct(">BxL")
ITEM_LENGTH = struct.Struct(">L")


class DulWakeup:
    """A pipe whose read end a DUL thread polls; ``wake`` from any thread ends that wait. Closed once, by
    the DUL thread as it ends: a later ``wake`` does nothing (its descriptor is never written after reuse)."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # the pipe is full: a wake-up is pending anyway
                os.write(self._write_fd, b"\0")

    def wait_readable(self, sock: Any, timeout: float) -> bool:
        """Block until ``sock`` is readable (or closed, or in error: its next read says which), a wake-up arrives or
        ``timeout`` passes; whether ``sock`` is. An SSL socket with decrypted bytes already buffered is readable
        at once. ``poll``, not ``select``: descriptors above 1024 are fine."""
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)  # ValueError for a closed socket
        poller.register(self.read_fd, select.POLLIN)
        ready = {descriptor for descriptor, _ in poller.poll(timeout * 1000)}
        if self.read_fd in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.read_fd, 4096):
                    pass
        return sock.fileno() in ready

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.read_fd)
                os.close(self._write_fd)


class NotifyingQueue(queue.Queue):
    """A ``queue.Queue`` that calls ``notify`` after each ``put``."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class ReceivedPData:
    """A received P-DATA-TF PDU as the state machine takes it from ``_recv_pdu``: its presentation data values as
    ``[context ID, view of the value]``, the views into the one buffer the PDU was read into."""

    def __init__(self, values: list[list[Any]]) -> None:
        self.values = values

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        primitive._presentation_data_value_list = self.values  # views, not bytes: the setter would refuse them
        return primitive


def split_values(body: bytearray) -> list[list[Any]] | None:
    """The presentation data values of a P-DATA-TF PDU's body (PS3.8 9.3.5) as ``[context ID, view]``, each view
    starting with its message control header; None if an item length is impossible."""
    view = memoryview(body)
    values: list[list[Any]] = []
    offset = 0
    while offset < len(body):
        if offset + 4 > len(body):
            return None
        (length,) = ITEM_LENGTH.unpack_from(body, offset)
        end = offset + 4 + length
        if length < 2 or end > len(body):  # a context ID and a message control header at least
            return None
        values.append([body[offset + 4], view[offset + 5:end]])
        offset = end
    return values or None


class NodeDUL(DULServiceProvider):
    """pynetdicom's DUL that is woken when it has something to send or must stop, and reads P-DATA-TF in place
    (see the module docstring)."""

    wakeup: DulWakeup
    activity: threading.Event

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wakeup.wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.wakeup.wake()
        return super().stop_dul()

    def has_pending_work(self) -> bool:
        """Whether a loop of the reactor has something to do without reading the socket."""
        return (self._kill_thread or not self.event_queue.empty() or not self.to_provider_queue.empty()
                or self.artim_timer.expired)

    def wait_timeout(self) -> float:
        """How long the reactor may block: until the ARTIM timer expires, at most ``MAX_WAIT_SECONDS``."""
        timer = self.artim_timer
        if timer._start_time is None or timer._end_time is not None:  # never started, or stopped
            return MAX_WAIT_SECONDS
        return max(0.0, min(MAX_WAIT_SECONDS, timer.remaining))

    def _read_pdu_data(self) -> None:
        if (self.state_machine.current_state != "Sta6" or not self.event_queue.empty()
                or watches_received_pdus(self.assoc)):
            super()._read_pdu_data()
            return
        try:
            header = self.socket.recv(PDU_HEADER.size)
        except (OSError, TimeoutError):
            log.warning("association from %s: the connection closed before a PDU was received",
                        self.assoc.requestor.address)
            self.event_queue.put("Evt17")
            return
        if len(header) != PDU_HEADER.size or header[0] != P_DATA_TF_TYPE:
            self.socket.unread(header)  # pynetdicom reads (and judges) it again
            super()._read_pdu_data()
            return
        self._read_p_data_tf(PDU_HEADER.unpack(header)[1])

    def _read_p_data_tf(self, length: int) -> None:
        try:
            body = self.socket.recv(length)
        except (OSError, TimeoutError):
            log.warning("association from %s: the connection closed within a P-DATA-TF PDU",
                        self.assoc.requestor.address)
            self.event_queue.put("Evt17")
            return
        if len(body) != length:
            log.warning("association from %s: the connection closed after %d of a P-DATA-TF PDU's %d bytes",
                        self.assoc.requestor.address, len(body), length)
            self.event_queue.put("Evt17")
            return
        values = split_values(body)
        if values is None:
            log.warning("association from %s: a P-DATA-TF PDU whose item lengths do not add up",
                        self.assoc.requestor.address)
            self.event_queue.put("Evt19")  # invalid PDU: the state machine aborts the association
            return
        self._recv_pdu.put(ReceivedPData(values))
        self.event_queue.put("Evt10")

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.activity.set()  # the association thread sees at once that the DUL has ended
            self.wakeup.close()


class NodeDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider whose non-blocking ``get_msg`` (the association reactor's poll) first waits
    for the association's ``activity``."""

    activity: threading.Event

    def get_msg(self, block: bool = False) -> Any:
        if not block and self.msg_queue.empty():
            self.activity.wait(MAX_WAIT_SECONDS)
            self.activity.clear()  # whatever set it before this is checked by the reactor right after
        return super().get_msg(block)


def watches_received_pdus(assoc: Association) -> bool:
    """Whether a handler other than pynetdicom's standard log handler (which logs P-DATA-TF only at DEBUG) is
    bound to the received-PDU events, or that log is on: then every PDU must be decoded for them."""
    if assoc.get_handlers(evt.EVT_DATA_RECV):
        return True
    handlers = [handler for handler, *_ in assoc.get_handlers(evt.EVT_PDU_RECV)]
    return any(handler is not standard_pdu_recv_handler for handler in handlers) or (
        bool(handlers) and logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG))


def adopt(assoc: Association) -> None:
    """Give a freshly created acceptor association (its threads not started) the node's DUL and DIMSE
    providers. Its socket must be a ``dicom_node.transport.BoundedSocket``."""
    dul, dimse = assoc.dul, assoc.dimse
    activity = threading.Event()
    dul.__class__ = NodeDUL
    dimse.__class__ = NodeDIMSE
    dul.wakeup = DulWakeup()
    dul.activity = dimse.activity = activity
    # Still empty: replaced by queues that wake the thread that reads them.
    dul.to_provider_queue = NotifyingQueue(dul.wakeup.wake)
    dul.to_user_queue = NotifyingQueue(activity.set)
    dimse.msg_queue = NotifyingQueue(activity.set)
