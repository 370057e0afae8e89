"""The example booking service: `python main.py` serves it; `main.py upstream NAME` one upstream.

The root `app.yaml` is the embedded default: an in-memory broker and both
upstream services inside this process, so nothing else has to run.
`python main.py --workers N` runs N orchestrator processes on the one port
under a supervisor (see `orchestrator.workers`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field, model_validator

import facade.async_booking
import facade.sync_booking
import facade.throttling_booking
from handler import BookingHandler
from node import Upstreams
from orchestrator import Orchestrator, run
from orchestrator.broker import broker_from_settings
from orchestrator.config import PemFile, Settings, StrictModel, load_settings
from orchestrator.errors import BrokerUnavailable, ConfigError, StartupError
from orchestrator.logs import configure_logging
from orchestrator.metrics import MetricsServer, WorkersMetrics
from orchestrator.server import OrchestratorServer
from orchestrator.service import GrpcService
from orchestrator.store import store_from_url
from orchestrator.tls import channel_credentials
from orchestrator.tracing import configure_tracing
from orchestrator.workers import Supervisor, current_worker, metrics_directory, worker_count
from pb import booking_pb2, booking_pb2_grpc
from upstream.server import RunningUpstream, serve_upstream

log = logging.getLogger("booking")

MAIN = Path(__file__).resolve()
"""This program: what a supervisor runs as each worker."""
SHARED_UPSTREAMS_ENV = "BOOKING_SHARED_UPSTREAMS"
"""Set by the supervisor for its workers: the addresses of the embedded upstreams it serves
(JSON), which the workers call instead of starting their own."""


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
    """Start the configured embedded upstreams; point the clients at their bound ports.

    A worker uses those its supervisor started (`SHARED_UPSTREAMS_ENV`) instead.
    """
    shared = os.environ.get(SHARED_UPSTREAMS_ENV) if current_worker() is not None else None
    if shared:
        addresses = {name: UpstreamSettings(address=a) for name, a in json.loads(shared).items()}
        upstreams = settings.upstreams.model_copy(update=addresses)
        return settings.model_copy(update={"upstreams": upstreams}), []
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
    facade.throttling_booking.register(orchestrator, upstreams)
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
    try:
        app = build_app(settings, embedded)
    except ValueError as exc:
        # A facade the configuration cannot apply to (`sagas.facades.<name>`), named.
        print(f"configuration error: {exc}", file=sys.stderr)
        for running in embedded:
            await running.stop()
        return 2
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


async def supervise(settings: AppSettings, count: int) -> int:
    """Run `count` workers (this program again, each one orchestrator) on the gRPC port until
    SIGINT or SIGTERM; the embedded upstreams and the metrics port are served here, once."""
    settings, embedded = await start_embedded(settings)
    env = {**os.environ, "ORCH_WORKERS": "1"}
    if embedded:
        env[SHARED_UPSTREAMS_ENV] = json.dumps(
            {name: getattr(settings.upstreams, name).address for name in ("order", "payment")}
        )
    argv = [sys.executable, str(MAIN)]
    grace = settings.grpc.shutdown_grace_seconds + settings.grpc.drain_seconds
    log.info(
        "booking service starting",
        extra={"workers": count, "port": settings.grpc.port, "broker": settings.broker.safe_url},
    )
    metrics = settings.metrics
    try:
        with contextlib.ExitStack() as stack:
            directory = stack.enter_context(metrics_directory()) if metrics.enabled else None
            server = (
                MetricsServer(WorkersMetrics(directory), metrics.host, metrics.port)
                if directory is not None
                else None
            )
            if server is not None:
                try:
                    await server.start()
                except OSError as exc:
                    raise StartupError(
                        f"metrics.port: cannot listen on {metrics.host}:{metrics.port}: "
                        f"{exc.strerror or exc}"
                    ) from None
            try:
                supervisor = Supervisor(
                    argv, count, env=env, stop_timeout=grace + 10, metrics_dir=directory
                )
                return await supervisor.run()
            finally:
                if server is not None:
                    await server.close()
    finally:
        for running in embedded:
            await running.stop()


def main(argv: Sequence[str]) -> int:
    """Entry point: `main.py [--workers N]`, or `main.py upstream order|payment ...`."""
    if argv[:1] == ["upstream"]:
        from upstream.server import main as upstream_main

        return upstream_main(argv[1:])
    parser = argparse.ArgumentParser(prog="main.py", description="Serve the booking service.")
    parser.add_argument(
        "--workers",
        type=int,
        help="orchestrator processes sharing the gRPC port, 0 for one per core "
        "(default: `workers` in the config, ORCH_WORKERS, else 1)",
    )
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    if args.workers is not None:
        environ["ORCH_WORKERS"] = str(args.workers)
    try:
        settings = load_settings(AppSettings, environ=environ)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, json_lines=settings.log_format == "json")
    count = worker_count(settings.workers)
    supervising = count > 1 and current_worker() is None
    try:
        if not supervising:
            configure_tracing(settings.tracing)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return run(supervise(settings, count) if supervising else serve(settings))
    except StartupError as exc:
        # A port in use, a store out of reach: the setting and its value, on one line.
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
