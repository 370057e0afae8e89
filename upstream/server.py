"""Run a demo upstream as a gRPC server, from tests or from the command line.

In code, :func:`serve_upstream` starts a server and returns a
:class:`RunningUpstream` (its bound port, ledger and ``stop``). On the command
line, ``python main.py upstream order|payment [--port N] [--db PATH]
[--latency-ms X] [--fail-rate Y] [--fail-after-apply-rate Z]`` reaches
:func:`run_upstream_main`, which serves until SIGINT or SIGTERM (:func:`main`
runs it on uvloop).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# The asyncio servicer; ``health.aio`` re-exports it, but the stubs predate it.
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from pb import order_pb2, order_pb2_grpc, payment_pb2, payment_pb2_grpc
from upstream.concurrency import CallGauge
from upstream.ledger import MEMORY, Ledger
from upstream.order import OrderServicer
from upstream.payment import PaymentServicer

Service = Literal["order", "payment"]

SERVICES: Final[tuple[Service, ...]] = get_args(Service)
DEFAULT_PORTS: Final[Mapping[Service, int]] = {"order": 50051, "payment": 50052}
SERVICE_NAMES: Final[Mapping[Service, str]] = {
    "order": order_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name,
    "payment": payment_pb2.DESCRIPTOR.services_by_name["PaymentService"].full_name,
}
STOP_GRACE_SECONDS: Final = 5.0

_log = logging.getLogger(__name__)


def _host_port(host: str, port: int) -> str:
    # An IPv6 literal needs brackets, or its colons read as the port separator.
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class RunningUpstream:
    """A started upstream server: where it listens, its ledger, and how to stop it."""

    service: Service
    server: grpc.aio.Server
    host: str
    port: int
    """The bound port: the one asked for, or the one the OS picked for port 0."""
    ledger: Ledger
    health: HealthServicer
    calls: CallGauge
    """The service's calls in progress now, and their peak: how many it served at once."""

    @property
    def target(self) -> str:
        """``host:port`` to pass to ``grpc.aio.insecure_channel``."""
        return _host_port(self.host, self.port)

    async def stop(self, grace: float | None = STOP_GRACE_SECONDS) -> None:
        """Report NOT_SERVING, give in-flight calls ``grace`` seconds, close the ledger.

        ``grace=None`` cancels in-flight calls at once. Calling it again is harmless.
        """
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        # Only after the server is stopped, so no handler is left mid-statement.
        self.ledger.close()


async def serve_upstream(
    service: Service,
    *,
    host: str = "127.0.0.1",
    port: int,
    db_path: str = MEMORY,
    latency_ms: float = 0,
    fail_rate: float = 0,
    fail_after_apply_rate: float = 0,
    credentials: grpc.ServerCredentials | None = None,
) -> RunningUpstream:
    """Build and start a server for ``service``, with health checks and reflection.

    ``port=0`` binds a free port, reported as ``RunningUpstream.port``.
    ``db_path`` is the SQLite file of the ledger (``":memory:"`` keeps nothing
    across restarts). ``latency_ms``, ``fail_rate`` and ``fail_after_apply_rate``
    go to the servicer, see :class:`~upstream.order.FaultInjector`. With
    ``credentials`` (``grpc.ssl_server_credentials(...)``) it serves TLS. The
    caller must ``await stop()``.
    Raises ``ValueError`` for bad options, ``RuntimeError`` when the port is taken.
    """
    if service not in SERVICES:
        raise ValueError(f"unknown upstream service {service!r}, expected one of {SERVICES}")
    ledger = Ledger(db_path)
    try:
        # Without this, gRPC's default SO_REUSEPORT lets a second server bind
        # a port already in use and silently share its traffic.
        calls = CallGauge()
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=[calls])
        faults = {
            "latency_ms": latency_ms,
            "fail_rate": fail_rate,
            "fail_after_apply_rate": fail_after_apply_rate,
        }
        if service == "order":
            order_pb2_grpc.add_OrderServiceServicer_to_server(
                OrderServicer(ledger, **faults), server
            )
        else:
            payment_pb2_grpc.add_PaymentServiceServicer_to_server(
                PaymentServicer(ledger, **faults), server
            )
        service_name = SERVICE_NAMES[service]
        health_servicer = HealthServicer()
        # Set before start, so no check ever sees the service as unknown.
        for name in ("", service_name):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = _host_port(host, port)
        bound_port = (
            server.add_insecure_port(address)
            if credentials is None
            else server.add_secure_port(address, credentials)
        )
        if bound_port == 0:  # older grpcio reports a failed bind this way instead of raising
            raise RuntimeError(f"cannot bind {_host_port(host, port)}")
        await server.start()
    except BaseException:
        ledger.close()
        raise
    return RunningUpstream(service, server, host, bound_port, ledger, health_servicer, calls)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {text}")
    return value


def build_arg_parser() -> argparse.ArgumentParser:
    """The parser of ``main.py upstream``'s arguments (everything after ``upstream``)."""
    parser = argparse.ArgumentParser(
        prog="main.py upstream",
        description="Serve a demo upstream service until SIGINT or SIGTERM.",
    )
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=_port,
        help="port to bind; 0 picks a free one (default: 50051 for order, 50052 for payment)",
    )
    parser.add_argument(
        "--db",
        default=MEMORY,
        help="SQLite file that keeps the records across restarts (default: in memory)",
    )
    parser.add_argument(
        "--latency-ms",
        type=_non_negative_float,
        default=0.0,
        help="delay added to every call, in milliseconds (default: 0)",
    )
    parser.add_argument(
        "--fail-rate",
        type=_rate,
        default=0.0,
        help="fraction of calls failed with UNAVAILABLE, from 0 to 1 (default: 0)",
    )
    parser.add_argument(
        "--fail-after-apply-rate",
        type=_rate,
        default=0.0,
        help="fraction of creates applied and then failed with UNAVAILABLE,"
        " as if the response were lost, from 0 to 1 (default: 0)",
    )
    return parser


async def run_upstream_main(argv: Sequence[str] | None = None) -> int:
    """Serve the upstream ``argv`` names until SIGINT or SIGTERM, then stop; return 0.

    ``argv`` is what follows ``upstream`` on the command line (``sys.argv[1:]``
    when ``None``). Stopping reports NOT_SERVING and then lets in-flight calls
    finish for up to five seconds.
    """
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    service: Service = args.service
    port: int = DEFAULT_PORTS[service] if args.port is None else args.port

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    # Installed before serving, so a signal sent as soon as the port answers is caught.
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stopping.set)
        except NotImplementedError:  # Windows: Ctrl+C then ends the run as KeyboardInterrupt
            continue
        handled.append(signum)
    try:
        running = await serve_upstream(
            service,
            host=args.host,
            port=port,
            db_path=args.db,
            latency_ms=args.latency_ms,
            fail_rate=args.fail_rate,
            fail_after_apply_rate=args.fail_after_apply_rate,
        )
        _log.info("%s upstream serving on %s (db %s)", service, running.target, args.db)
        try:
            await stopping.wait()
        finally:
            _log.info("%s upstream stopping", service)
            await running.stop(STOP_GRACE_SECONDS)
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    """Run :func:`run_upstream_main` on uvloop when it is installed."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_upstream_main(argv))
