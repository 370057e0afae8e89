"""Serving an Orchestrator over gRPC: health, reflection, and a graceful shutdown on SIGTERM.

With `grpc.tls` the port serves TLS (mutual TLS with a client CA); `access`
decides who may call SagaService and SagaAdmin (see `orchestrator.access`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from orchestrator._access_interceptor import AccessInterceptor
from orchestrator._access_policy import AccessPolicy
from orchestrator.admin import SagaAdminService, admin_grpc_service
from orchestrator.config import AccessSettings, GrpcSettings, MetricsSettings, UiSettings
from orchestrator.errors import ConfigError, StartupError, StoreUnavailable
from orchestrator.metrics import MetricsServer
from orchestrator.registry import Orchestrator
from orchestrator.service import GrpcService
from orchestrator.status import SagaStatusService, saga_grpc_service
from orchestrator.tls import server_credentials
from orchestrator.workers import current_worker

if TYPE_CHECKING:
    from orchestrator.console import ConsoleServer

__all__ = ["ADMISSION_SERVICE", "LIVENESS_SERVICE", "GrpcService", "OrchestratorServer", "run"]

log = logging.getLogger("orchestrator.server")

LIVENESS_SERVICE = "liveness"
"""Health name that stays SERVING from start until shutdown, whatever the broker's state:
a liveness probe on it restarts a stuck process, never one waiting out a broker outage."""

ADMISSION_SERVICE = "admission"
"""Health name that is SERVING only while the whole server is and no facade of this replica
refuses new calls (at its `max_in_flight`, or its first topic just found full): what a load
balancer that routes each new call checks, to steer it to another replica."""

T = TypeVar("T")

_UNBINDABLE = "the port is in use, or the host is not an address of this machine"


class OrchestratorServer:
    """A grpc.aio server that serves the application's services beside health and reflection.

    Health is SERVING only while the orchestrator's broker is reachable, and
    turns NOT_SERVING the moment shutdown begins, so load balancers drain it
    before in-flight calls are cut. `access` guards SagaService and SagaAdmin;
    without it (or with no credentials in it) they are open to every caller.
    With `ui` enabled, the saga console (`orchestrator.console`) is served on
    its own HTTP port, under the same access rules; without the `console`
    extra that is a ConfigError naming `ui.enabled`.
    """

    def __init__(
        self,
        orchestrator: Orchestrator,
        settings: GrpcSettings,
        services: Sequence[GrpcService],
        *,
        metrics: MetricsSettings | None = None,
        access: AccessSettings | None = None,
        ui: UiSettings | None = None,
    ) -> None:
        self.orchestrator = orchestrator
        worker = current_worker()
        self._worker = worker is not None
        # Of a supervisor's workers, the first serves the console: its sign-in sessions live
        # in one process, and what it shows and does goes through the store they share.
        console_here = worker is None or worker.index == 0
        self._ui = ui if ui is not None and ui.enabled and console_here else None
        if self._ui is not None:
            _console_server()  # fails now, not once the orchestrator has started
        self.console: ConsoleServer | None = None
        """The console's server, once started (None when `ui` is off, and on every supervised
        worker but the first)."""
        self.settings = settings
        self._access = AccessPolicy(access or AccessSettings())
        # A supervised worker shares the port with the others, and its supervisor serves
        # every worker's metrics (see orchestrator.workers).
        self._metrics_server = (
            MetricsServer(orchestrator.metrics, metrics.host, metrics.port)
            if metrics is not None and metrics.enabled and worker is None
            else None
        )
        self._metrics_address = "" if metrics is None else f"{metrics.host}:{metrics.port}"
        self._services = list(services)
        # Without this, a second server could bind the same port and silently share its
        # traffic; workers of one supervisor share it on purpose.
        # Open access needs no interceptor (every call runs as ANONYMOUS without one), and
        # none keeps the application's calls on grpc's direct path.
        self._server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0 if worker is None else 1)],
            interceptors=[AccessInterceptor(self._access)] if self._access.enforced else [],
        )
        self._health = health_aio.HealthServicer()
        self._stopping = False
        self._health_task: asyncio.Task[None] | None = None
        self._admission_task: asyncio.Task[None] | None = None
        self._serving = False  # the broker's side of health, as last set
        self.port = 0
        """The bound port, once started (useful with port 0)."""
        self.status: SagaStatusService | None = None
        """The saga status servicer, once started."""

    @property
    def metrics_port(self) -> int:
        """The bound metrics port, once started; 0 when metrics are off."""
        return self._metrics_server.port if self._metrics_server is not None else 0

    async def start(self) -> int:
        """Start the orchestrator, then serve; returns the bound port.

        Raises StartupError naming the setting (`grpc.port`, `metrics.port`, `ui.port`,
        `store.url`) when its port cannot be bound or the store cannot be reached.

        `orchestrator.v1.SagaService` (GetSaga, ListSagas, WatchSaga) and
        `orchestrator.v1.SagaAdmin` (operator actions and dead letters) are served
        beside the application's services.
        """
        status_service, self.status = saga_grpc_service(
            self.orchestrator.store, facades=sorted(self.orchestrator.facades)
        )
        # Watchers wake on this replica's writes at once; the store's change feed (or polling)
        # brings them the others'.
        self.orchestrator.on_saga_change(self.status.notify)
        self._services.append(status_service)
        admin_service = admin_grpc_service(self.orchestrator)
        self._services.append(admin_service)
        for service in self._services:
            service.register(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            [
                *(service.name for service in self._services),
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self._server,
        )
        if not self._worker:
            # Bound before anything starts: a port in use stops startup before it connects.
            self._bind()
        if not self._access.enforced:
            log.warning(
                "access control is off: no tokens or client certificates are configured, so "
                "anyone who reaches this port may read and act on sagas (configure `access`)"
            )
        if self._ui is not None:
            # Bound before anything starts, as the gRPC port is: a port in use stops startup.
            assert isinstance(admin_service.servicer, SagaAdminService)
            self.console = _console_server()(
                self.orchestrator, self._ui, self._access, self.status, admin_service.servicer
            )
            await self.console.start()
        try:
            await self.orchestrator.start()
        except StoreUnavailable as exc:
            raise StartupError(f"store.url: {exc}") from None
        if self._metrics_server is not None:
            try:
                await self._metrics_server.start()
            except OSError as exc:
                raise StartupError(
                    f"metrics.port: cannot listen on {self._metrics_address}: {exc.strerror or exc}"
                ) from None
        if self._worker:
            # grpc listens as soon as it binds, and the kernel hands a listening worker its
            # share of new connections: bound only now, a worker (re)starting takes none
            # until it can answer them.
            self._bind()
        broker = self.orchestrator.broker
        broker.add_health_listener(self._on_broker_health)
        self.orchestrator.on_saturation(self._on_saturation)
        await self._server.start()
        await self._health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._set_health(broker.healthy)
        log.info(
            "serving",
            extra={
                "address": f"{self.settings.host}:{self.port}",
                "tls": "off"
                if self.settings.tls is None
                else ("mutual" if self.settings.tls.client_ca_file else "on"),
                "access": repr(self._access),
            },
        )
        return self.port

    def _bind(self) -> None:
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            if self.settings.tls is None:
                self.port = self._server.add_insecure_port(address)
            else:
                credentials = server_credentials(self.settings.tls)
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc's "Failed to bind": the port is taken, or not ours
            self.port = 0
        if not self.port:
            raise StartupError(f"grpc.port: cannot listen on {address}: {_UNBINDABLE}")

    async def stop(self, grace: float | None = None) -> None:
        """Turn NOT_SERVING, let in-flight calls finish within `grace`, then close the broker."""
        if self._stopping:
            return
        self._stopping = True
        await self._health.enter_graceful_shutdown()
        if self.settings.drain_seconds:
            # Health checks still answer (NOT_SERVING) here; server.stop refuses them.
            await asyncio.sleep(self.settings.drain_seconds)
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        await self._server.stop(grace)
        if self.console is not None:
            await self.console.close()
        if self.status is not None:
            self.status.close()
        await self.orchestrator.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()
        log.info("stopped")

    async def serve_until_signalled(self) -> None:
        """Start, serve until SIGINT or SIGTERM, then stop gracefully.

        The signal handlers stay installed after the first signal, so a second
        one cannot kill the process halfway through its shutdown. Once started,
        the objects made so far are frozen out of the cyclic garbage collector
        (`gc.freeze`): modules, descriptors, the application and its connections
        live as long as the process, and every full collection would otherwise
        walk them all again while the loop waits.
        """
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await self.start()
            gc.freeze()
            await stop.wait()
            log.info("signal received, shutting down")
        finally:
            await self.stop()

    def _on_broker_health(self, healthy: bool) -> None:
        if not self._stopping:
            # Keep a reference: the loop holds tasks weakly.
            self._health_task = asyncio.get_running_loop().create_task(self._set_health(healthy))

    def _on_saturation(self, _saturated: bool) -> None:
        if not self._stopping:
            self._admission_task = asyncio.get_running_loop().create_task(self._set_admission())

    async def _set_health(self, healthy: bool) -> None:
        if self._stopping:
            return
        self._serving = healthy
        for name in ("", *(service.name for service in self._services)):
            await self._health.set(name, _status(healthy))
        await self._set_admission()
        log.info("health changed", extra={"serving": healthy})

    async def _set_admission(self) -> None:
        if self._stopping:
            return
        saturated = self.orchestrator.saturated
        await self._health.set(ADMISSION_SERVICE, _status(self._serving and not saturated))
        if saturated:
            log.info("saturated: refusing new calls", extra={"facades": ", ".join(saturated)})


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )


def _console_server() -> type[ConsoleServer]:
    """`orchestrator.console.ConsoleServer`, or a ConfigError naming `ui.enabled` when the
    `console` extra is not installed."""
    try:
        from orchestrator.console import ConsoleServer
    except ImportError as exc:
        raise ConfigError(
            f"ui.enabled: the console needs the 'console' extra ({exc.name} cannot be "
            "imported): pip install 'saga-orchestrator[console]'"
        ) from None
    return ConsoleServer


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop when it is installed (10-15% more throughput), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
