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

**P-DATA-TF read value by value.** pynetdicom copies a received P-DATA-TF PDU into a new ``bytearray``, then
into ``bytes``, slices each presentation data value out of it and then its message control header off it, before
the DIMSE layer appends the fragment to its ``BytesIO``: five copies of every byte of a 7 MB mammogram, in fresh
memory, under the interpreter lock, and a trip through its event queue and state machine for each PDU (~50 µs;
DCMTK sends a mammogram in ~50 PDUs of 128 KiB, many modalities in ~400 of 16 KiB). ``NodeDUL`` reads such a
PDU, when it is the next event of an established association (Sta6), value by value: a data set fragment of a
C-STORE request goes from the socket straight into the request's ``DatasetSpool`` (``dicom_node.dataset_spool``),
from which the instance is decoded and written; any other value goes to the DIMSE layer as pynetdicom's DT-2
action would give it. Every other PDU, and every P-DATA-TF PDU while a handler of the node or a debug log
watches received PDUs or state transitions (asked before each PDU, ~1 µs), takes pynetdicom's own path.
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
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.utils import make_target

from dicom_node.dataset_spool import DatasetSpool, file_header

log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 0.1
P_DATA_TF_TYPE = 0x04
PDU_HEADER = struct.Struct(">BxL")
ITEM_HEADER = struct.Struct(">LBB")  # item length, presentation context ID, message control header
COMMAND_ELEMENT = struct.Struct("<2xHL")  # group 0000, element, length (implicit VR little endian)
US = struct.Struct("<H")
COMMAND_LAST_FRAGMENT = 0x03  # message control header: a command, its last fragment
READ_AHEAD = 10  # the smallest PDU of any type (A-RELEASE, A-ABORT): a peer that owes a PDU owes this much
STANDARD_LOG_HANDLERS = ((evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
                         (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
                         (evt.EVT_PDU_RECV, standard_pdu_recv_handler), (evt.EVT_PDU_SENT, standard_pdu_sent_handler))


class _ImpossibleItemLengthError(Exception):
    """A P-DATA-TF item that does not fit its PDU."""


class _MessageTooLargeError(Exception):
    """A DIMSE message whose fragments add up to more than the node takes."""


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


def p_data(context_id: int, value: bytes) -> P_DATA:
    """A P-DATA indication of one presentation data value (its message control header first)."""
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[context_id, value]]
    return primitive


def spool_for(assoc: Association, context_id: int, control: int) -> DatasetSpool | None:
    """The spool a data set fragment (``control``: its message control header) of the message being received goes
    into: that of a C-STORE request whose command is complete, made on its first fragment. None for anything else
    (a command, another message, a context not accepted, a data set already begun in a ``BytesIO``), which
    pynetdicom's DIMSE layer decodes as usual."""
    message = assoc.dimse.message
    if control & 1 or not isinstance(message, C_STORE_RQ) or message.context_id != context_id:
        return None
    if isinstance(message.data_set, DatasetSpool):
        return message.data_set
    context = assoc._accepted_cx.get(context_id)
    if context is None or message.data_set.getbuffer().nbytes:
        return None
    command = message.command_set
    try:
        header = file_header(str(command.AffectedSOPClassUID), str(command.AffectedSOPInstanceUID),
                             str(context.transfer_syntax[0]))
    except (AttributeError, UnicodeEncodeError, struct.error):  # a command without its UIDs, or bad ones: pynetdicom
        return None  # takes the data set, and the node refuses it once the message is complete
    try:
        message.data_set = DatasetSpool(header)
    except OSError:  # no memory for its map (strict overcommit counts the whole reservation): pynetdicom's path
        return None
    return message.data_set


class NodeDUL(DULServiceProvider):
    """pynetdicom's DUL that is woken when it has something to send or must stop, and reads P-DATA-TF value by
    value (see the module docstring)."""

    wakeup: DulWakeup
    activity: threading.Event
    _counted_bytes: int = 0  # of the command or data set being received (``_count_message``)

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
        """Read a P-DATA-TF PDU's body value by value (see the module docstring); an item length that does not fit
        aborts the association (Evt19), a connection that closes within the PDU ends it (Evt17)."""
        requestor = self.assoc.requestor.address
        remaining = length
        try:
            self.socket.check_pdu_length(length)
            while remaining:
                if remaining < ITEM_HEADER.size:
                    raise _ImpossibleItemLengthError
                item_length, context_id, control = ITEM_HEADER.unpack(self.socket.recv_exactly(ITEM_HEADER.size))
                remaining -= ITEM_HEADER.size
                if item_length < 2 or item_length - 2 > remaining:  # a context ID and a message control header
                    raise _ImpossibleItemLengthError
                remaining -= item_length - 2
                self._count_message(item_length - 2, last=bool(control & 2))
                spool = spool_for(self.assoc, context_id, control)
                if spool is None:
                    value = bytes((control,)) + self.socket.recv_exactly(item_length - 2)
                    self.assoc.dimse.receive_primitive(p_data(context_id, value))
                    continue
                self._receive_fragment(spool, item_length - 2, read_ahead=not remaining and not control & 2)
                if control & 2:  # the last fragment: the DIMSE layer completes the message as usual
                    self.assoc.dimse.receive_primitive(p_data(context_id, bytes((control,))))
        except (_ImpossibleItemLengthError, _MessageTooLargeError) as error:
            if isinstance(error, _MessageTooLargeError):
                log.warning("association from %s aborted: a message of more than %d MiB", requestor,
                            self.socket.message_limit >> 20)
            else:
                log.warning("association from %s: a P-DATA-TF PDU whose item lengths do not add up", requestor)
            with contextlib.suppress(OSError, TimeoutError):  # the rest of the PDU, read as pynetdicom would
                self.socket.recv(remaining)
            self.event_queue.put("Evt19")  # invalid PDU: the state machine aborts the association
        except (OSError, TimeoutError):
            log.warning("association from %s: the connection closed within a P-DATA-TF PDU", requestor)
            self.event_queue.put("Evt17")

    def _count_message(self, count: int, last: bool) -> None:
        """Add a fragment of ``count`` bytes to the command or data set being received (``last``: its last
        fragment, after which the count starts again); ``_MessageTooLargeError`` past the socket's
        ``message_limit`` (a peer that never sends a data set's last fragment)."""
        self._counted_bytes += count
        if self._counted_bytes > self.socket.message_limit:
            raise _MessageTooLargeError
        if last:
            self._counted_bytes = 0

    def _receive_fragment(self, spool: DatasetSpool, count: int, read_ahead: bool) -> None:
        """Read a data set fragment of ``count`` bytes into ``spool``. With ``read_ahead`` (it ends its PDU and is
        not the message's last, so the peer owes another PDU) the same read takes the first ``READ_AHEAD`` bytes
        of the next PDU, put back for the next read (a P-DATA-TF's header and item length): two reads per PDU,
        not three. Never more than any PDU holds, so that an A-ABORT there is read at once; a peer that closes
        the connection instead leaves what it sent to be read as usual."""
        wanted = count + (READ_AHEAD if read_ahead else 0)
        read = self.socket.fill(spool.room(wanted))
        if read < count:
            raise ConnectionError(f"the connection closed after {read} of a fragment's {count} bytes")
        spool.advance(count)
        if read > count:
            self.socket.unread(spool.room(read - count))

    def run_reactor(self) -> None:
        """pynetdicom's reactor loop without its sleep: each loop sends a queued primitive or reads a PDU (waiting
        in ``BoundedSocket.ready`` for data, a wake-up or a timer while it has nothing else to do), then works
        through one queued event. pynetdicom sleeps 1 ms after a loop that queued no event, which a P-DATA-TF
        PDU read here never does; a sleep of 0 would still release the interpreter lock once per PDU."""
        self._idle_timer.start()
        self.assoc._dul_ready.set()
        while not self._kill_thread:
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if not self._process_recv_primitive() and self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                log.exception("association from %s: aborted after an error in its upper layer",
                              self.assoc.requestor.address)
                self._abort_at_once()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                continue
            self.state_machine.do_action(event)

    def _abort_at_once(self) -> None:
        """Send an A-ABORT bypassing the state machine (its state is unknown after an error) and stop both
        reactors, as pynetdicom does."""
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = 0x02, 0x00
        self.socket.send(abort.encode())
        self.assoc.is_aborted, self.assoc.is_established = True, False
        self.assoc._kill = self._kill_thread = True

    def run(self) -> None:
        try:
            super().run()
        finally:
            unfinished = self.assoc.dimse.message
            if unfinished is not None and isinstance(unfinished.data_set, DatasetSpool):
                unfinished.data_set.release()  # an aborted or dropped transfer: its map goes back to the pool
            self.activity.set()  # the association thread sees at once that the DUL has ended
            self.wakeup.close()


class NodeDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider whose non-blocking ``get_msg`` (the association reactor's poll) first waits
    for the association's ``activity``, and which encodes a plain C-STORE response itself."""

    activity: threading.Event

    def get_msg(self, block: bool = False) -> Any:
        if not block and self.msg_queue.empty():
            self.activity.wait(MAX_WAIT_SECONDS)
            self.activity.clear()  # whatever set it before this is checked by the reactor right after
        return super().get_msg(block)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """A C-STORE response that carries only its status, while no handler watches sent messages, goes out as
        the one P-DATA value ``c_store_response`` encodes (~10 µs); pynetdicom builds and encodes a pydicom
        dataset for it twice (~1 ms per instance, under the interpreter lock). Anything else: pynetdicom."""
        if (isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None
                and primitive.ErrorComment is None and primitive.OffendingElement is None
                and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            try:
                command = c_store_response(primitive)
            except (UnicodeEncodeError, struct.error, TypeError):  # UIDs or values pynetdicom judges itself
                command = None
            if command is not None and not 0 < self.maximum_pdu_size < len(command) + 6:  # one fragment
                self.dul.send_pdu(p_data(context_id, bytes((COMMAND_LAST_FRAGMENT,)) + command))
                return
        super().send_msg(primitive, context_id)


def c_store_response(primitive: C_STORE) -> bytes:
    """The command set of a C-STORE response (PS3.7 9.3.1.2) with no optional status fields, in implicit VR
    little endian: byte for byte pynetdicom's encoding of it. ``TypeError`` without both UIDs."""
    if not (primitive.AffectedSOPClassUID and primitive.AffectedSOPInstanceUID):
        raise TypeError("a C-STORE response without its SOP class and instance UIDs")
    elements = b"".join((
        _command_element(0x0002, str(primitive.AffectedSOPClassUID).encode("ascii")),
        _command_element(0x0100, US.pack(0x8001)),  # Command Field: C-STORE-RSP
        _command_element(0x0120, US.pack(primitive.MessageIDBeingRespondedTo)),
        _command_element(0x0800, US.pack(0x0101)),  # Command Data Set Type: none
        _command_element(0x0900, US.pack(primitive.Status)),
        _command_element(0x1000, str(primitive.AffectedSOPInstanceUID).encode("ascii"))))
    return _command_element(0x0000, struct.pack("<L", len(elements))) + elements


def _command_element(element: int, value: bytes) -> bytes:
    value += b"\0" * (len(value) % 2)  # UIDs are padded with NUL to even length
    return COMMAND_ELEMENT.pack(element, len(value)) + value


def watches_received_pdus(assoc: Association) -> bool:
    """Whether a handler other than pynetdicom's standard log handler (which logs P-DATA-TF only at DEBUG) is
    bound to the received-PDU events, or that log is on, or a handler is bound to the state machine's
    transitions: then every PDU must be decoded for them, and go through the state machine."""
    if assoc.get_handlers(evt.EVT_DATA_RECV) or assoc.get_handlers(evt.EVT_FSM_TRANSITION):
        return True
    handlers = [handler for handler, *_ in assoc.get_handlers(evt.EVT_PDU_RECV)]
    return any(handler is not standard_pdu_recv_handler for handler in handlers) or (
        bool(handlers) and logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG))


def adopt(assoc: Association) -> None:
    """Give a freshly created acceptor association (its threads not started) the node's DUL and DIMSE
    providers, and unbind pynetdicom's standard log handlers unless its log takes INFO. Its socket must be a
    ``dicom_node.transport.BoundedSocket``."""
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
    dul._target = make_target(dul.run_reactor)  # the thread was made to run pynetdicom's reactor
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        for event, handler in STANDARD_LOG_HANDLERS:  # they format every message and PDU for a log that drops it
            assoc.unbind(event, handler)
