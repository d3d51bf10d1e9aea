"""TLS for the Storage SCP (and the SCU to destinations marked ``tls``), from files named in the settings."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from pathlib import Path

from models.errors import ConfigurationError

log = logging.getLogger(__name__)


def server_context(certificate: Path, private_key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ server context; with ``client_ca``, peers must present a certificate it signed (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(certificate), keyfile=str(private_key))
        if client_ca is not None:
            context.load_verify_locations(cafile=str(client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise ConfigurationError(f"TLS certificate/key could not be loaded: {error}") from error
    return context


class ReloadingServerContext:
    """The SCP's server context, made again from its files when one of them changes (a certificate renewed in
    place by the site's PKI or an ACME client): each new connection is wrapped by the context of the files as
    they are then, checked by modification time, size and inode (a ``stat`` per file). A renewal that cannot be
    loaded yet (a key not written yet) keeps the context before, with a warning, until the files load. A bad
    certificate at start raises ``ConfigurationError`` (``server_context``)."""

    def __init__(self, certificate: Path, private_key: Path, client_ca: Path | None = None) -> None:
        self._files = (certificate, private_key, client_ca)
        self._lock = threading.Lock()
        self._stamp = self._stamp_now()
        self._context = server_context(*self._files)

    def current(self) -> ssl.SSLContext:
        with self._lock:
            stamp = self._stamp_now()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._context = server_context(*self._files)
                    log.info("TLS certificate, key or client CA changed: reloaded for new connections")
                except ConfigurationError as error:
                    log.warning("TLS files changed but do not load (%s): new connections keep the previous "
                                "certificate until they do", error)
            return self._context

    def wrap_socket(self, sock: socket.socket, **kwargs: object) -> ssl.SSLSocket:
        """``SSLContext.wrap_socket`` with the current context (what the association server calls)."""
        return self.current().wrap_socket(sock, **kwargs)

    def _stamp_now(self) -> tuple[tuple[int, int, int] | None, ...]:
        return tuple(_stamp(path) for path in self._files)


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What tells a file's versions apart: modification time, size and inode (None: absent or unreadable)."""
    try:
        status = Path(path).stat() if path is not None else None
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino) if status else None


ServerTLS = ReloadingServerContext | ssl.SSLContext  # what the SCP's server wraps each connection with


def client_context(ca: Path | None, certificate: Path | None = None,
                   private_key: Path | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ client context that verifies the peer against ``ca`` (system CAs when None), and that its
    certificate names the peer: the destination's ``tls_server_name``, else its host (an IP address is checked
    against the certificate's IP subject alternative names). Without the name check any certificate of the CA
    (every modality's client certificate, with a site CA) could stand in for the PACS."""
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if certificate is not None and private_key is not None:
            context.load_cert_chain(certfile=str(certificate), keyfile=str(private_key))
    except (OSError, ssl.SSLError) as error:
        raise ConfigurationError(f"TLS client certificate/key could not be loaded: {error}") from error
    return context
