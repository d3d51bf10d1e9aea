"""The SCP's network reads: bounded by the PDU size the node announces, and in large chunks.

pynetdicom reads each PDU by asking its socket for the length the PDU header declares, in 4 KiB ``recv``
calls appended to a ``bytearray``. Two problems for a node on a hospital network:

- a peer that declares a 4 GiB PDU is read until it stops sending, all of it in memory, whatever maximum
  length the node announced in its A-ASSOCIATE-AC;
- a 7 MB mammogram costs ~1,700 ``recv`` calls and as many re-allocations, under the GIL.

``BoundedSocket`` refuses a read longer than the announced maximum (plus the 6-byte header) with an
``OSError``, which pynetdicom's DUL handles as a closed transport (Evt17: the association is aborted and the
connection closed), and reads into one preallocated buffer (or a view the caller gives, as the upper layer
does for an image's fragments) with ``recv_into`` in chunks of up to 1 MiB.

pynetdicom also gives every association a ``copy.deepcopy`` of the server's presentation contexts: with every
storage SOP class accepted (``store_non_mammography``), ~170 contexts of 11 transfer syntaxes, 17 ms of CPU on an
idle machine and ~30 ms under load, under the GIL, per association. ``NodeServer`` holds them in a
``PresentationContexts`` list, whose deep copy copies each context and its transfer-syntax list but shares the
(immutable) UIDs: 0.5 ms.
"""

from __future__ import annotations

import copy
import logging
import socket
import socketserver
import ssl
import struct
from typing import Any

from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node import upper_layer

log = logging.getLogger(__name__)

PDU_HEADER = 6
CHUNK = 1 << 20


class PduTooLargeError(OSError):
    """A peer declared a PDU longer than the maximum length the node announced."""


class BoundedSocket(AssociationSocket):
    """An ``AssociationSocket`` whose reads never exceed ``limit`` bytes and fill one buffer."""

    limit: int
    message_limit: int = 1 << 62  # bytes of one DIMSE message's fragments (``NodeServer.maximum_message_bytes``)
    _unread: bytes = b""

    def unread(self, data: bytes) -> None:
        """Put ``data`` (just read) back: the next ``recv`` returns it first."""
        self._unread = bytes(data) + self._unread

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only when the peer closes the connection first)."""
        self.check_pdu_length(nr_bytes)
        buffer = bytearray(nr_bytes)
        read = self.fill(memoryview(buffer))
        del buffer[read:]
        return buffer

    def check_pdu_length(self, nr_bytes: int) -> None:
        """``PduTooLargeError`` if ``nr_bytes`` is more than the node announced."""
        if nr_bytes > self.limit:
            log.warning("association from %s aborted: it sent a PDU of %d bytes, above the %d announced",
                        self.assoc.requestor.address, nr_bytes, self.limit)
            raise PduTooLargeError(f"PDU of {nr_bytes} bytes exceeds the maximum of {self.limit}")

    def recv_exactly(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` of a PDU whose length was checked; ``ConnectionError`` if the peer closes the
        connection first."""
        buffer = bytearray(nr_bytes)
        if self.fill(memoryview(buffer)) != nr_bytes:
            raise ConnectionError(f"the connection closed before the {nr_bytes} bytes asked for arrived")
        return buffer

    def fill(self, view: memoryview) -> int:
        """Read into ``view`` until it is full or the peer closes the connection; how many bytes were read. A
        plain socket waits in the kernel for the whole view (MSG_WAITALL: one call, and one release of the
        interpreter lock, where reading what has arrived took ~3 per 128 KiB); a TLS one reads what has arrived."""
        read = 0
        if self._unread:
            read = min(len(view), len(self._unread))
            view[:read], self._unread = self._unread[:read], self._unread[read:]
        flags = 0 if isinstance(self.socket, ssl.SSLSocket) else socket.MSG_WAITALL
        while read < len(view):
            count = self.socket.recv_into(view[read:], min(len(view) - read, CHUNK), flags)
            if not count:  # closed by the peer
                break
            read += count
        return read

    @property
    def ready(self) -> bool:
        """Whether the peer has sent data; with an event-driven DUL (``dicom_node.upper_layer``) that has nothing
        else to do, this waits for data, a wake-up or the DUL's timeout instead of answering at once."""
        dul = self.assoc.dul
        if (self.socket is None or self._is_connected is False or not isinstance(dul, upper_layer.NodeDUL)
                or dul.has_pending_work()):
            return AssociationSocket.ready.fget(self)
        if dul.state_machine.current_state == "Sta6" and self.assoc.dimse.message is not None:
            return True  # the peer owes the rest of a message: read without a poll (a stall: the receive timeout)
        try:
            return dul.wakeup.wait_readable(self.socket, dul.wait_timeout())
        except (OSError, ValueError):  # closed under the wait: as pynetdicom's own check reports it
            self.event_queue.put("Evt17")
            return False


class NodeRequestHandler(RequestHandler):
    """pynetdicom's request handler, its association reading through a ``BoundedSocket``; a TLS connection's
    handshake is made here, in the association's own thread (``NodeServer.get_request``)."""

    def handle(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.do_handshake()  # bounded by the network timeout the server set
            except (OSError, ValueError) as error:
                log.warning("TLS handshake with %s failed: %s", self.client_address[0], type(error).__name__)
                self.request.close()
                return
            self.request.settimeout(None)  # as pynetdicom's sockets are: reads are bounded by SO_RCVTIMEO
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # The socket pynetdicom made has already queued the "connection open" event: it is kept and given the
        # subclass's reads (a second socket object would queue that event twice).
        sock = assoc.dul.socket
        sock.__class__ = BoundedSocket
        maximum = self.ae.maximum_pdu_size
        sock.limit = PDU_HEADER + maximum if maximum else 1 << 62
        sock.message_limit = self.server.maximum_message_bytes
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a C-FIND's responses go at once
        if self.ae.network_timeout:  # a read the peer leaves unfinished this long fails: the association ends
            seconds = float(self.ae.network_timeout)
            sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                   struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))
        upper_layer.adopt(assoc)
        return assoc


class PresentationContexts(list[PresentationContext]):
    """The server's supported contexts; a deep copy (one per association) copies the contexts and their
    transfer-syntax lists, not the UID strings, which are immutable."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with ``NodeRequestHandler`` and ``PresentationContexts``.
    ``shutdown()`` stops serving and closes the socket (the server is made with ``make_server``, so it is not in
    its AE's server list). ``maximum_message_bytes``: the most one DIMSE message's fragments may add up to."""

    maximum_message_bytes: int = 1 << 62

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, request_handler=NodeRequestHandler, **kwargs)
        self.contexts = PresentationContexts(self.contexts)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection. pynetdicom makes the TLS handshake here, in the one thread that accepts every
        connection and with no timeout: a peer that connected and sent nothing kept every other peer out. The
        socket is only wrapped here; its handshake waits for its own thread (``NodeRequestHandler.handle``),
        for at most the network timeout."""
        client, address = self.socket.accept()
        if self.ssl_context:
            client.settimeout(self.ae.network_timeout)
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)
        self.server_close()
