"""The example booking service: `python main.py` serves it; `main.py upstream NAME` one upstream.

The root `app.yaml` is the embedded default: an in-memory broker and both
upstream services inside this process, so nothing else has to run.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from pydantic import Field, model_validator

import facade.async_booking
import facade.sync_booking
from handler import BookingHandler
from node import Upstreams
from orchestrator import Orchestrator, run
from orchestrator.broker import broker_from_settings
from orchestrator.config import PemFile, Settings, StrictModel, load_settings
from orchestrator.errors import BrokerUnavailable, ConfigError, StartupError
from orchestrator.logs import configure_logging
from orchestrator.server import OrchestratorServer
from orchestrator.service import GrpcService
from orchestrator.store import store_from_url
from orchestrator.tls import channel_credentials
from orchestrator.tracing import configure_tracing
from pb import booking_pb2, booking_pb2_grpc
from upstream.server import RunningUpstream, serve_upstream

log = logging.getLogger("booking")


class UpstreamSettings(StrictModel):
    """Where an upstream service listens."""

    address: str
    """`host:port` of its gRPC server."""


class UpstreamTlsSettings(StrictModel):
    """TLS to the upstream services: whom to trust and, for mutual TLS, who we are."""

    ca_file: PemFile | None = None
    """CA bundle (PEM) the upstreams' certificates must chain to; without it, the system's."""
    cert_file: PemFile | None = None
    """Client certificate (PEM) to present, for upstreams that require mutual TLS."""
    key_file: PemFile | None = None
    """The client certificate's private key (PEM)."""

    @model_validator(mode="after")
    def _cert_with_key(self) -> UpstreamTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class UpstreamsSettings(StrictModel):
    """The upstream services the booking nodes call."""

    order: UpstreamSettings = UpstreamSettings(address="127.0.0.1:50051")
    """The Order service."""
    payment: UpstreamSettings = UpstreamSettings(address="127.0.0.1:50052")
    """The Payment service."""
    timeout_seconds: float = Field(default=3.0, gt=0, le=300)
    """Deadline of each upstream call."""
    tls: UpstreamTlsSettings | None = None
    """Call the upstreams over TLS (plaintext without it)."""


class EmbeddedUpstreamSettings(StrictModel):
    """An upstream service started inside the orchestrator's process."""

    port: int = Field(ge=0, le=65535)
    """Port it serves on (0: any free port)."""
    db_path: str = ":memory:"
    """Its SQLite ledger file; `:memory:` keeps nothing across restarts."""


class EmbeddedSettings(StrictModel):
    """Upstream services to start in this process (the embedded default)."""

    order: EmbeddedUpstreamSettings | None = None
    """Start the Order service in process."""
    payment: EmbeddedUpstreamSettings | None = None
    """Start the Payment service in process."""


class AppSettings(Settings):
    """app.yaml of the booking service: the framework's sections plus its own."""

    upstreams: UpstreamsSettings = Field(default_factory=UpstreamsSettings)
    """The upstream services the booking nodes call."""
    embedded_upstreams: EmbeddedSettings = Field(default_factory=EmbeddedSettings)
    """Upstream services to start inside this process (the embedded default)."""


@dataclass
class BookingApp:
    """The assembled service: orchestrator, server, upstream clients and embedded upstreams."""

    settings: AppSettings
    orchestrator: Orchestrator
    server: OrchestratorServer
    upstreams: Upstreams
    embedded: list[RunningUpstream] = field(default_factory=list)

    async def stop(self) -> None:
        """Stop serving, then close the clients and the embedded upstreams."""
        await self.server.stop()
        await self.upstreams.close()
        for running in self.embedded:
            await running.stop()


async def start_embedded(settings: AppSettings) -> tuple[AppSettings, list[RunningUpstream]]:
    """Start the configured embedded upstreams; point the clients at their bound ports."""
    started: list[RunningUpstream] = []
    addresses = {}
    for name in ("order", "payment"):
        embedded = getattr(settings.embedded_upstreams, name)
        if embedded is None:
            continue
        try:
            running = await serve_upstream(name, port=embedded.port, db_path=embedded.db_path)
        except RuntimeError:  # the port is taken
            for earlier in started:
                await earlier.stop()
            raise StartupError(
                f"embedded_upstreams.{name}.port: cannot listen on 127.0.0.1:{embedded.port}: "
                "the port is in use"
            ) from None
        started.append(running)
        addresses[name] = UpstreamSettings(address=running.target)
    upstreams = settings.upstreams.model_copy(update=addresses)
    return settings.model_copy(update={"upstreams": upstreams}), started


def build_app(settings: AppSettings, embedded: Sequence[RunningUpstream] = ()) -> BookingApp:
    """Wire the booking service: one Orchestrator, the facades, the handler, the server."""
    orchestrator = Orchestrator(
        broker_from_settings(settings.broker),
        store=store_from_url(settings.store.url.get_secret_value()),
        heartbeat_seconds=settings.store.heartbeat_seconds,
        lease_seconds=settings.store.lease_seconds,
        sagas=settings.sagas,
        dead_letters=settings.dead_letters,
    )
    tls = settings.upstreams.tls
    upstreams = Upstreams.connect(
        order_address=settings.upstreams.order.address,
        payment_address=settings.upstreams.payment.address,
        timeout_seconds=settings.upstreams.timeout_seconds,
        credentials=None
        if tls is None
        else channel_credentials(tls.ca_file, tls.cert_file, tls.key_file),
    )
    facade.sync_booking.register(orchestrator, upstreams)
    facade.async_booking.register(orchestrator, upstreams)
    booking_service = GrpcService(
        booking_pb2.DESCRIPTOR.services_by_name["BookingService"].full_name,
        booking_pb2_grpc.add_BookingServiceServicer_to_server,
        BookingHandler(orchestrator),
    )
    server = OrchestratorServer(
        orchestrator,
        settings.grpc,
        [booking_service],
        metrics=settings.metrics,
        access=settings.access,
        ui=settings.ui,
    )
    return BookingApp(settings, orchestrator, server, upstreams, list(embedded))


@contextlib.asynccontextmanager
async def running_app(settings: AppSettings) -> AsyncIterator[BookingApp]:
    """Start the whole service (embedded upstreams included) and stop it on exit."""
    settings, embedded = await start_embedded(settings)
    app = build_app(settings, embedded)
    try:
        await app.server.start()
        yield app
    finally:
        await app.stop()


async def serve(settings: AppSettings) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit status."""
    settings, embedded = await start_embedded(settings)
    app = build_app(settings, embedded)
    log.info(
        "booking service starting",
        extra={
            "port": settings.grpc.port,
            "broker": settings.broker.safe_url,
            "store": settings.store.safe_url or "memory://",
        },
    )
    try:
        await app.server.serve_until_signalled()
    except BrokerUnavailable as exc:
        log.error("cannot start: %s", exc)
        return 1
    finally:
        await app.stop()
    return 0


def main(argv: Sequence[str]) -> int:
    """Entry point: `main.py [upstream order|payment ...]`."""
    if argv[:1] == ["upstream"]:
        from upstream.server import main as upstream_main

        return upstream_main(argv[1:])
    try:
        settings = load_settings(AppSettings)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, json_lines=settings.log_format == "json")
    try:
        configure_tracing(settings.tracing)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return run(serve(settings))
    except StartupError as exc:
        # A port in use, a store out of reach: the setting and its value, on one line.
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
