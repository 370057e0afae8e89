"""Certificates made with trustme, and an OrchestratorServer served with TLS and access settings.

`Pki` writes a CA, a server certificate for `localhost`/`127.0.0.1`, client
certificates and a second, untrusted CA into a directory, so the config can
name them by path the way a deployment does.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import trustme

from orchestrator import Orchestrator
from orchestrator.broker import InMemoryBroker
from orchestrator.config import AccessSettings, GrpcSettings, ServerTlsSettings
from orchestrator.server import OrchestratorServer
from orchestrator.service import GrpcService
from orchestrator.store import InMemorySagaStore

BOUND = 5.0
"""Seconds any single call in these tests may take."""


@dataclass(frozen=True)
class KeyPair:
    """A certificate chain and its key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """A trusted CA with a server and client certificates, and an untrusted CA with its own."""

    ca: Path
    server: KeyPair
    reader: KeyPair
    """Client certificate with CN `reader.example` (SAN `reader.example`)."""
    operator: KeyPair
    """Client certificate with CN `operator.example`."""
    stranger: KeyPair
    """Client certificate of the trusted CA that no access rule names."""
    other_ca: Path
    """A CA nobody trusts."""
    foreign: KeyPair
    """Client certificate of `other_ca`."""
    foreign_server: KeyPair
    """Server certificate for `localhost`/`127.0.0.1` of `other_ca`."""


def _write(directory: Path, name: str, cert: trustme.LeafCert) -> KeyPair:
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    pair.cert.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(pair.key))
    return pair


def make_pki(directory: Path) -> Pki:
    """Issue every certificate the security tests use into `directory`."""
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    other.cert_pem.write_to_path(str(directory / "other-ca.pem"))
    return Pki(
        ca=directory / "ca.pem",
        server=_write(directory, "server", ca.issue_cert("localhost", "127.0.0.1")),
        reader=_write(
            directory, "reader", ca.issue_cert("reader.example", common_name="reader.example")
        ),
        operator=_write(
            directory, "operator", ca.issue_cert("operator.example", common_name="operator.example")
        ),
        stranger=_write(
            directory, "stranger", ca.issue_cert("stranger.example", common_name="stranger.example")
        ),
        other_ca=directory / "other-ca.pem",
        foreign=_write(
            directory,
            "foreign",
            other.issue_cert("operator.example", common_name="operator.example"),
        ),
        foreign_server=_write(
            directory, "foreign-server", other.issue_cert("localhost", "127.0.0.1")
        ),
    )


def client_credentials(ca: Path, pair: KeyPair | None = None) -> grpc.ChannelCredentials:
    """Channel credentials trusting `ca`, presenting `pair` when given."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=pair.key.read_bytes() if pair else None,
        certificate_chain=pair.cert.read_bytes() if pair else None,
    )


@contextlib.asynccontextmanager
async def served(
    *,
    access: AccessSettings | None = None,
    tls: ServerTlsSettings | None = None,
    services: Sequence[GrpcService] = (),
    orchestrator: Orchestrator | None = None,
) -> AsyncIterator[int]:
    """An OrchestratorServer (by default an Orchestrator with an in-memory broker and store,
    and no facades) on a free port; yields the port."""
    if orchestrator is None:
        orchestrator = Orchestrator(InMemoryBroker(), store=InMemorySagaStore())
    server = OrchestratorServer(
        orchestrator,
        GrpcSettings(host="127.0.0.1", port=0, shutdown_grace_seconds=0, tls=tls),
        list(services),
        access=access,
    )
    port = await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token`."""
    return (("authorization", f"Bearer {token}"),)
