"""The Storage SCP: C-ECHO and C-STORE of mammograms (pynetdicom), answering only after the store committed.

The same AE answers C-FIND (Study Root, STUDY level) over the worklist: see ``dicom_node.find_scp``.
``start_scp`` serves in this process; ``make_shared_port_server`` is the same SCP for one of several processes
sharing the port (``dicom_node.scp_pool``).

Statuses returned by ``handle_store`` (PS3.4 Annex B.2.3):

- ``0x0000`` Success: the file is on disk (fsynced) and its row is committed.
- ``0xA700`` Refused, out of resources: the disk or the database failed, the process ran out of memory, or the
  data directory has less free space than ``min_free_disk_mb`` (checked before anything is written); the sender
  should retry later.
- ``0xA900`` Error, dataset does not match SOP class: the dataset's SOP class is not the command's.
- ``0xC000`` Error, cannot understand: the dataset cannot be decoded (checked element by element, inflated
  with a limit), its pixel data is cut short, it carries an invalid UID, or its SOP instance UID is not the
  command's.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification
from sqlalchemy.exc import SQLAlchemyError

from dicom_node import metrics
from dicom_node.dataset_spool import DatasetSpool, file_header
from dicom_node.find_scp import handle_find
from dicom_node.release import ReleaseTracker
from dicom_node.settings import Settings
from dicom_node.storage import InstanceStore, InvalidUIDError
from dicom_node.tls import ServerTLS
from dicom_node.transport import NodeServer
from dicom_node.validation import MalformedInstanceError, decode_received

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900

BREAST_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1.2",      # Digital Mammography X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",    # - For Processing
    "1.2.840.10008.5.1.4.1.1.13.1.3",   # Breast Tomosynthesis Image (stored, not analysed)
    "1.2.840.10008.5.1.4.1.1.13.1.4",   # Breast Projection X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.13.1.5",   # - For Processing
)
# Uncompressed, and the compressed syntaxes mammography units send; stored as received, decoded by workers.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEG2000Lossless, JPEG2000, JPEGLSLossless, JPEGLSNearLossless, JPEGLosslessSV1, JPEGLossless, RLELossless,
]


class FreeSpaceGuard:
    """Whether ``folder``'s file system has at least ``min_free_mb`` MiB free. ``shutil.disk_usage`` is asked at
    most once per ``interval`` seconds (the answer is cached), so the check costs nothing per instance."""

    def __init__(self, folder: Path, min_free_mb: float, interval: float = 1.0) -> None:
        self.folder = Path(folder)
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)
        self.interval = interval
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._free: int | None = None

    def free_bytes(self) -> int | None:
        """The free bytes seen at most ``interval`` ago; None when they cannot be read (not a refusal)."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.interval:
                self._checked = now
                folder = self.folder
                while not folder.exists() and folder != folder.parent:  # before the first store
                    folder = folder.parent
                try:
                    self._free = shutil.disk_usage(folder).free
                except OSError:
                    self._free = None
            return self._free

    def too_low(self) -> int | None:
        """The free bytes when they are below the minimum, else None."""
        if self.min_free_bytes <= 0:
            return None
        free = self.free_bytes()
        return free if free is not None and free < self.min_free_bytes else None


def handle_store(event: Event, store: InstanceStore, space: FreeSpaceGuard | None = None,
                 senders: ReleaseTracker | None = None) -> int:
    """EVT_C_STORE handler: write and record the instance, then return a status (see the module docstring).
    ``senders`` learns which study each association stored to (see ``dicom_node.release``). A data set the
    upper layer received into a ``DatasetSpool`` is decoded and written from it, and its memory given back."""
    received = event.request.DataSet
    spool = received if isinstance(received, DatasetSpool) else None
    try:
        return _store(event, store, space, senders, spool)
    finally:
        if spool is not None:
            spool.release()


def _store(event: Event, store: InstanceStore, space: FreeSpaceGuard | None, senders: ReleaseTracker | None,
           spool: DatasetSpool | None) -> int:
    sop_uid = str(event.request.AffectedSOPInstanceUID)
    syntax = str(event.context.transfer_syntax)
    free = space.too_low() if space is not None else None
    if free is not None:  # refused before anything is decoded or written; UIDs only in the log
        metrics.rejected(metrics.DISK_FULL)
        log.error("refused instance %s: %.0f MiB free in %s, below min_free_disk_mb %.0f MiB (out of resources; "
                  "the sender should retry)", sop_uid[:64], free / 2**20, space.folder,
                  space.min_free_bytes / 2**20)
        return OUT_OF_RESOURCES
    try:  # decoding can only be the sender's fault: never "out of resources"
        received = spool.dataset if spool is not None else event.encoded_dataset(include_meta=False)
        dataset = decode_received(received, syntax)
        status = _command_disagrees(event, dataset)
    except MalformedInstanceError as error:
        metrics.rejected(metrics.MALFORMED)
        log.warning("refused instance %s from %s: %s", sop_uid[:64], event.assoc.requestor.ae_title, error)
        return CANNOT_UNDERSTAND
    except MemoryError:
        return _out_of_memory(sop_uid)
    except Exception as error:  # a malformed dataset can raise anything while decoding
        metrics.rejected(metrics.UNDECODABLE)
        log.warning("refused undecodable instance %s: %s", sop_uid[:64], type(error).__name__)
        return CANNOT_UNDERSTAND
    if status is not None:
        metrics.rejected(metrics.MALFORMED)
        return status
    try:
        encoded = spool.image() if spool is not None else (
            file_header(str(event.request.AffectedSOPClassUID), sop_uid, syntax), received)
        stored = store.store(encoded, dataset, syntax, event.assoc.requestor.ae_title)
    except (InvalidUIDError, MalformedInstanceError) as error:
        metrics.rejected(metrics.MALFORMED)
        log.warning("refused instance %s from %s: %s", sop_uid[:64], event.assoc.requestor.ae_title, error)
        return CANNOT_UNDERSTAND
    except OSError as error:
        metrics.rejected(metrics.DISK_FULL if error.errno == errno.ENOSPC else metrics.IO_ERROR)
        reason = "disk full" if error.errno == errno.ENOSPC else f"I/O error {error.errno}"
        log.error("could not store instance %s: %s", sop_uid[:64], reason)
        return OUT_OF_RESOURCES
    except SQLAlchemyError as error:
        metrics.rejected(metrics.DATABASE_ERROR)
        log.error("could not record instance %s: database error %s", sop_uid[:64], type(error).__name__)
        return OUT_OF_RESOURCES
    except MemoryError:
        return _out_of_memory(sop_uid)
    except Exception as error:  # the node's own failure (the dataset's are MalformedInstanceError): the sender
        metrics.rejected(metrics.INTERNAL_ERROR)  # is asked to retry, not told its instance is refused for good
        log.error("could not store instance %s: %s (out of resources; the sender should retry)", sop_uid[:64],
                  type(error).__name__)
        return OUT_OF_RESOURCES
    metrics.stored(stored.analysable)
    if stored.analysable and senders is not None:
        senders.stored(event, stored.study_instance_uid)
    if not stored.analysable:
        log.info("instance %s is SOP class %s: stored, not analysed", stored.sop_instance_uid,
                 event.request.AffectedSOPClassUID)
    return SUCCESS


def _out_of_memory(sop_uid: str) -> int:
    """A store that ran out of memory is the node's shortage, not the sender's fault: refused for now (0xA700),
    so that the sender retries, instead of refused as not understood (0xC000), which it would not retry."""
    metrics.rejected(metrics.OUT_OF_MEMORY)
    log.error("could not store instance %s: out of memory (out of resources; the sender should retry)",
              sop_uid[:64])
    return OUT_OF_RESOURCES


def _command_disagrees(event: Event, dataset: Dataset) -> int | None:
    """0xA900 when the dataset's SOP class is not the command's, 0xC000 when its SOP instance is not; None when
    they agree (the instance is stored under the UIDs the sender announced, nothing else)."""
    request = event.request
    if str(dataset.get("SOPClassUID", "")) != str(request.AffectedSOPClassUID):
        log.warning("refused instance %s: its SOP class is not the C-STORE command's",
                    str(request.AffectedSOPInstanceUID)[:64])
        return DATASET_DOES_NOT_MATCH_SOP_CLASS
    if str(dataset.get("SOPInstanceUID", "")) != str(request.AffectedSOPInstanceUID):
        log.warning("refused instance %s: the dataset's SOP instance UID is not the C-STORE command's",
                    str(request.AffectedSOPInstanceUID)[:64])
        return CANNOT_UNDERSTAND
    return None


def _count_accepted(event: Event) -> None:
    metrics.association(accepted=True)


def _log_rejected(event: Event) -> None:
    metrics.association(accepted=False)
    requestor = event.assoc.requestor
    log.warning("association rejected: calling AE %r from %s", requestor.ae_title, requestor.address)


def build_ae(settings: Settings) -> AE:
    """The application entity with the node's AE title, contexts, limits and allow-list."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.maximum_pdu_size  # enforced on every read (dicom_node.transport)
    ae.maximum_associations = settings.maximum_associations
    ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.add_supported_context(Verification)
    # explicit VR first: the private state/suspicion keep their VR, so peers print them as text
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind,
                             [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for sop_class in BREAST_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if settings.store_non_mammography:  # otherwise their presentation contexts are refused at association
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax not in BREAST_SOP_CLASSES:
                ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    if not settings.allowed_calling_aes:
        log.warning("no calling-AE allow-list is set: any AE title may store to %s", settings.ae_title)
    return ae


class ReusePortServer(NodeServer):
    """An association server whose socket shares its port with the node's other SCP processes (SO_REUSEPORT):
    the kernel spreads the incoming connections over them. Only sockets of the same user can join the port."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def scp_handlers(settings: Settings, store: InstanceStore, on_ready: Callable[[], None] | None = None,
                 senders: ReleaseTracker | None = None) -> list[tuple]:
    """The event handlers of the SCP: C-STORE into ``store``, C-FIND over its database, association counts, and
    the promotion of complete studies when their sender releases the association (``senders``, by default a
    new ``ReleaseTracker``; then ``on_ready()``)."""
    space = FreeSpaceGuard(store.root, settings.min_free_disk_mb)
    senders = senders or ReleaseTracker(store.sessions, settings.study_inactivity_timeout, on_ready,
                                        store.writers.turn)
    return [(evt.EVT_C_STORE, handle_store, [store, space, senders]), (evt.EVT_ACCEPTED, _count_accepted),
            (evt.EVT_REJECTED, _log_rejected), (evt.EVT_C_FIND, handle_find, [store.sessions, settings.ae_title]),
            (evt.EVT_RELEASED, senders.released), (evt.EVT_CONN_CLOSE, senders.closed)]


ServerT = TypeVar("ServerT", bound=NodeServer)


def _make_server(settings: Settings, handlers: list[tuple], server_class: type[ServerT],
                 ssl_context: ServerTLS | None) -> ServerT:
    """The SCP's listening server of ``server_class``, with the node's AE and message bound."""
    server = build_ae(settings).make_server((settings.bind_host, settings.port), ssl_context=ssl_context,
                                            evt_handlers=handlers, server_class=server_class)
    server.maximum_message_bytes = settings.maximum_message_mb << 20
    return server


def start_scp(settings: Settings, store: InstanceStore, ssl_context: ServerTLS | None = None,
              on_ready: Callable[[], None] | None = None, senders: ReleaseTracker | None = None) -> NodeServer:
    """Start the Storage (and C-FIND) SCP in background threads; call ``.shutdown()`` on the result to stop it.
    ``on_ready`` is called when a released association made a study READY; ``senders``: the tracker of the
    associations' studies (see ``scp_handlers``)."""
    server = _make_server(settings, scp_handlers(settings, store, on_ready, senders), NodeServer, ssl_context)
    threading.Thread(target=server.serve_forever, name="StorageSCP", daemon=True).start()
    log.info("Storage SCP %s listening on %s:%d", settings.ae_title, settings.bind_host, server.server_address[1])
    return server


def make_shared_port_server(settings: Settings, store: InstanceStore,
                            ssl_context: ServerTLS | None = None) -> ReusePortServer:
    """The SCP of ``start_scp``, bound with SO_REUSEPORT and listening; the caller runs ``serve_forever()``."""
    server = _make_server(settings, scp_handlers(settings, store), ReusePortServer, ssl_context)
    log.info("Storage SCP %s process %d listening on %s:%d", settings.ae_title, os.getpid(), settings.bind_host,
             server.server_address[1])
    return server
