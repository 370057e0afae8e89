"""TLS material from the configuration: gRPC server and channel credentials, AMQPS contexts.

The configuration checks that every file it names is readable PEM; these
helpers read them when a server, channel or broker connection is made.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from orchestrator.config import BrokerTlsSettings, ServerTlsSettings

__all__ = [
    "broker_ssl_context",
    "channel_credentials",
    "server_credentials",
    "tls_failure",
]


def server_credentials(settings: ServerTlsSettings) -> grpc.ServerCredentials:
    """Credentials for `add_secure_port`; mutual TLS (a client certificate required) when a
    client CA is configured."""
    client_ca = _read(settings.client_ca_file) if settings.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(_read(settings.key_file), _read(settings.cert_file))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials for a client channel: trust `ca_file` (else the system's CAs) and,
    with `cert_file` and `key_file`, present that client certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file) if ca_file else None,
        private_key=_read(key_file) if key_file else None,
        certificate_chain=_read(cert_file) if cert_file else None,
    )


def broker_ssl_context(settings: BrokerTlsSettings | None) -> ssl.SSLContext:
    """A client context that verifies the broker's chain and host name (no opting out)."""
    ca_file = settings.ca_file if settings is not None else None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None
    )
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if settings is not None and settings.cert_file is not None and settings.key_file is not None:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


def tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind `exc` (itself, a cause, a context or an argument), if any."""
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        pending += [current.__cause__, current.__context__, *current.args]
    return None


def _read(path: Path) -> bytes:
    return path.read_bytes()
