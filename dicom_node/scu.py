"""C-STORE of files to a DICOM peer (the results going back to PACS, and ``mammo-node send``)."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.settings import Destination
from models.errors import NodeError

log = logging.getLogger(__name__)

UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))


class SendError(NodeError):
    """The peer could not be reached, refused the association, or did not answer."""


NOT_SENT = -1  # the status of a file the peer gave no answer for, or that was not sent (``SendOutcome.problem``)
# PS3.7 C.1.3 and PS3.4 B.2.3: Warning statuses, with which the peer stored the object (besides 0xB000-0xBFFF)
STORED_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})


@dataclass(frozen=True)
class SendOutcome:
    """What became of one file: the peer's C-STORE status (0x0000 success; warnings also mean stored), or
    ``NOT_SENT`` with the ``problem`` (no answer when it is None)."""

    path: Path
    sop_instance_uid: str  # empty when the file could not be read
    status: int
    problem: str | None = None

    @property
    def stored(self) -> bool:
        return self.status == 0 or self.status in STORED_WARNINGS or 0xB000 <= self.status <= 0xBFFF

    def describe(self) -> str:
        """Why it was not stored, for the export's error and the operator: ``status 0xA700``, ``no answer``..."""
        if self.status != NOT_SENT:
            return f"status 0x{self.status:04X}"
        return self.problem or "no answer"


def _with_fallbacks(contexts: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Each compressed pair in its own presentation context (so that a peer which accepts it gets the file as
    it is, rather than picking an uncompressed syntax from a shared list), plus the uncompressed pairs."""
    return contexts | {(sop_class, syntax) for sop_class, _ in contexts for syntax in UNCOMPRESSED}


def _associate(destination: Destination, calling_ae: str, contexts: set[tuple[str, str]], timeout: float,
               ssl_context: ssl.SSLContext | None):
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntax in sorted(_with_fallbacks(contexts)):
        ae.add_requested_context(sop_class, syntax)
    tls = (ssl_context, destination.tls_server_name or destination.host) if ssl_context is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls)
    if not assoc.is_established:
        raise SendError(f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port}) "
                        "refused or did not answer the association")
    # Nagle's algorithm held each C-STORE's dataset PDU until the peer's delayed ACK of its command PDU: 40 ms
    # per object (measured: 52 -> 10 ms a SEG on localhost). pynetdicom leaves it on.
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def _as_sent(path: Path, header: pydicom.Dataset, assoc) -> Path | pydicom.Dataset:  # noqa: ANN001 (Association)
    """The file itself when the peer accepted its SOP class in its transfer syntax (pynetdicom then sends its
    bytes as they are, with no decoding and re-encoding); otherwise the decoded dataset, decompressed when the
    peer takes only uncompressed syntaxes (e.g. a PACS without JPEG 2000), for pynetdicom to encode as accepted."""
    accepted = {str(c.transfer_syntax[0]) for c in assoc.accepted_contexts if c.abstract_syntax == header.SOPClassUID}
    if not accepted:  # e.g. a PACS that takes the SR but not Segmentation Storage
        raise SendError(f"the peer accepted no presentation context for {header.SOPClassUID.name}")
    syntax = header.file_meta.TransferSyntaxUID
    if str(syntax) in accepted:
        return path
    ds = pydicom.dcmread(path)
    if accepted & set(UNCOMPRESSED) and syntax.is_compressed:
        log.info("peer does not accept %s for %s: sending it uncompressed", syntax, ds.SOPInstanceUID)
        ds.decompress(generate_instance_uid=False)  # lossless: the same instance, so the same UID
    return ds


def send_files(destination: Destination, paths: Sequence[Path], calling_ae: str, timeout: float = 30.0,
               ssl_context: ssl.SSLContext | None = None,
               before_each: Callable[[], None] | None = None) -> list[SendOutcome]:
    """Send the files over one association, each in its own SOP class and transfer syntax; one outcome per file,
    in order. A file that cannot be read or sent (the peer accepted no context for its SOP class, it cannot be
    decoded...) fails alone; once the peer stops answering, the rest are not sent. ``before_each`` is called
    before each file is sent (the export task extends its claim there). ``SendError`` when no association is
    made: nothing was sent."""
    outcomes: dict[int, SendOutcome] = {}
    readable: list[tuple[int, Path, pydicom.Dataset]] = []
    for index, path in enumerate(map(Path, paths)):
        try:
            readable.append((index, path, pydicom.dcmread(path, stop_before_pixels=True)))
        except Exception as error:  # missing, unreadable or not DICOM: this file fails, the others go
            outcomes[index] = SendOutcome(path, "", NOT_SENT, f"not sent: its file cannot be read ({_reason(error)})")
    if readable:
        contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, _, ds in readable}
        if len(_with_fallbacks(contexts)) > 128:
            raise SendError("more than 128 presentation contexts (SOP class / transfer syntax pairs) in one send")
        assoc = _associate(destination, calling_ae, contexts, timeout, ssl_context)
        try:
            outcomes.update(_send_each(assoc, readable, before_each))
        finally:
            assoc.release()
    return [outcomes[index] for index in range(len(paths))]


def _send_each(assoc, readable: list[tuple[int, Path, pydicom.Dataset]],  # noqa: ANN001 (Association)
               before_each: Callable[[], None] | None) -> dict[int, SendOutcome]:
    outcomes: dict[int, SendOutcome] = {}
    answering = True
    for index, path, header in readable:
        uid = str(header.get("SOPInstanceUID", ""))
        if not (answering and assoc.is_established):  # the peer stopped answering, or aborted
            outcomes[index] = SendOutcome(path, uid, NOT_SENT)
            continue
        if before_each is not None:
            try:
                before_each()
            except Exception as error:  # e.g. the database busy: the send goes on, the outcomes are kept
                log.warning("before sending %s: %s", uid, _reason(error))
        try:
            status = assoc.send_c_store(_as_sent(path, header, assoc))
        except Exception as error:  # no accepted context for it, undecodable, the association ended under it...
            problem = None if not assoc.is_established else f"not sent: {_reason(error)}"
            outcomes[index] = SendOutcome(path, uid, NOT_SENT, problem)
            continue
        code = int(status.Status) if status is not None and "Status" in status else NOT_SENT
        outcomes[index] = SendOutcome(path, uid, code)
        answering = code != NOT_SENT  # no answer within the DIMSE timeout: pynetdicom aborts the association
    return outcomes


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def echo(destination: Destination, calling_ae: str, timeout: float = 10.0,
         ssl_context: ssl.SSLContext | None = None) -> int:
    """C-ECHO the peer; returns the status (0 is success)."""
    assoc = _associate(destination, calling_ae, {(Verification, "1.2.840.10008.1.2")}, timeout, ssl_context)
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status is not None and "Status" in status else -1
    finally:
        assoc.release()
