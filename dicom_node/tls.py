"""TLS for the Storage SCP (and the SCU to destinations marked ``tls``), from files named in the settings."""

from __future__ import annotations

import ssl
from pathlib import Path

from models.errors import ConfigurationError


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
