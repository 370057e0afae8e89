"""Prometheus metrics of an Orchestrator, served over HTTP on the event loop.

Every Orchestrator owns a `Metrics` with its own registry, so several can
live in one process (tests do) without clashing in prometheus-client's
global registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, Final, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from orchestrator._loop_metrics import LoopCounter, LoopGauge, LoopHistogram
from orchestrator.workers import METRICS_DIR_ENV

__all__ = [
    "METRICS_PATH",
    "Exposition",
    "FacadeMetrics",
    "Metrics",
    "MetricsServer",
    "WorkersMetrics",
]

log = logging.getLogger("orchestrator.metrics")

METRICS_PATH: Final = "/metrics"
"""The HTTP path Prometheus scrapes (`prometheus.io/path` in the shipped manifests)."""

# Upstream calls take milliseconds; a stuck one is cut by its timeout.
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The saga, step and broker metrics, labelled by facade, kind, step and topic."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # The families every saga updates: plain numbers made into samples when collected
        # (`_loop_metrics`), unless a supervisor reads each worker's values from its files.
        multiprocess = bool(os.environ.get(METRICS_DIR_ENV))
        counter = Counter if multiprocess else LoopCounter
        histogram = Histogram if multiprocess else LoopHistogram
        self.sagas_started = counter(
            "orchestrator_sagas_started", "Sagas started.", ["facade", "kind"], registry=r
        )
        self.sagas_completed = counter(
            "orchestrator_sagas_completed",
            "Sagas whose every step succeeded.",
            ["facade", "kind"],
            registry=r,
        )
        self.sagas_failed = Counter(
            "orchestrator_sagas_failed",
            "Sagas stopped by a failing step (their rollback follows), by gRPC status.",
            ["facade", "kind", "code"],
            registry=r,
        )
        self.sagas_compensated = Counter(
            "orchestrator_sagas_compensated",
            "Rollbacks that finished: the saga is undone.",
            ["facade", "kind"],
            registry=r,
        )
        self.sagas_compensation_failed = Counter(
            "orchestrator_sagas_compensation_failed",
            "Rollbacks dead-lettered because a compensation kept failing.",
            ["facade", "kind"],
            registry=r,
        )
        # Gauge modes matter only under a supervisor (prometheus_client's multiprocess mode):
        # what is in flight sums over the live workers; the broker link is each worker's.
        self.sagas_in_flight = _in_flight_gauge(
            multiprocess,
            "orchestrator_sagas_in_flight",
            "Sync runs, and async hops, in progress on this replica.",
            ["facade", "kind"],
            r,
        )
        self.step_seconds = histogram(
            "orchestrator_step_duration_seconds",
            "Time a step (node) took, success or failure.",
            ["facade", "step"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.step_retries = Counter(
            "orchestrator_step_retries",
            "Attempts of a step repeated under its retry policy.",
            ["facade", "step"],
            registry=r,
        )
        self.redeliveries = Counter(
            "orchestrator_redeliveries",
            "Deliveries requeued for another attempt after their handler failed.",
            ["topic"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "orchestrator_dead_lettered",
            "Messages moved to a dead-letter queue.",
            ["topic"],
            registry=r,
        )
        self.journal_refused = Counter(
            "orchestrator_journal_refused",
            "Journal writes refused because the saga was not where the write expected "
            "(a duplicate, a stopped saga, a finished one: those never move).",
            ["facade", "write"],
            registry=r,
        )
        self.messages_refused = Counter(
            "orchestrator_messages_refused",
            "Messages the journal did not let act, by reason: dead-lettered (no such saga, "
            "not its step, not what the saga recorded, unreadable) or dropped as duplicates.",
            ["facade", "topic", "reason"],
            registry=r,
        )
        self.sagas_recovered = Counter(
            "orchestrator_sagas_recovered",
            "Stalled sagas recovery took over and drove to an end, by cause "
            "(deadline: it outlived it; orphaned: its replica went silent).",
            ["facade", "cause"],
            registry=r,
        )
        self.operator_actions = Counter(
            "orchestrator_operator_actions",
            "Operator actions (retry, compensate, resolve, replay, discard), by outcome: "
            "done, refused (not in a state it applies to), not_found, failed.",
            ["action", "outcome"],
            registry=r,
        )
        self.dead_letters_kept = Counter(
            "orchestrator_dead_letters_kept",
            "Dead-lettered messages taken from the broker into the dead-letter list.",
            ["topic"],
            registry=r,
        )
        self.broker_connected = Gauge(
            "orchestrator_broker_connected",
            "1 while the broker is reachable, else 0.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.calls_in_flight = _in_flight_gauge(
            multiprocess,
            "orchestrator_calls_in_flight",
            "Calls of a facade admitted and not yet answered on this replica (sync runs, "
            "throttling and inline callers waiting): what max_in_flight bounds.",
            ["facade"],
            r,
        )
        self.calls_refused = Counter(
            "orchestrator_calls_refused",
            "Calls refused with RESOURCE_EXHAUSTED before anything started, by cause: "
            "max_in_flight (this replica's limit) or queue_full (the first topic's length limit).",
            ["facade", "cause"],
            registry=r,
        )

    def for_facade(self, facade: str, kind: str) -> FacadeMetrics:
        """The metrics of one facade, with its labels bound once."""
        return FacadeMetrics(self, facade, kind)

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)


def _in_flight_gauge(
    multiprocess: bool,
    name: str,
    documentation: str,
    labelnames: list[str],
    registry: CollectorRegistry,
) -> Gauge | LoopGauge:
    """A gauge of what is in flight; under a supervisor, summed over the live workers."""
    if multiprocess:
        return Gauge(
            name, documentation, labelnames, registry=registry, multiprocess_mode="livesum"
        )
    return LoopGauge(name, documentation, labelnames, registry=registry)


class FacadeMetrics:
    """One facade's metric children, resolved once: label lookups stay off the hot path."""

    def __init__(self, metrics: Metrics, facade: str, kind: str) -> None:
        self._metrics = metrics
        self._facade = facade
        self._kind = kind
        self.started = metrics.sagas_started.labels(facade, kind)
        self.completed = metrics.sagas_completed.labels(facade, kind)
        self.compensated = metrics.sagas_compensated.labels(facade, kind)
        self.compensation_failed = metrics.sagas_compensation_failed.labels(facade, kind)
        self.in_flight = metrics.sagas_in_flight.labels(facade, kind)
        self.admitted = metrics.calls_in_flight.labels(facade)
        self._steps: dict[str, Any] = {}

    def failed(self, code: str) -> None:
        """Count a saga stopped by a failing step with status `code`."""
        self._metrics.sagas_failed.labels(self._facade, self._kind, code).inc()

    def retried(self, step: str) -> None:
        """Count one more attempt of `step`."""
        self._metrics.step_retries.labels(self._facade, step).inc()

    def refused(self, write: str) -> None:
        """Count a journal write the store refused."""
        self._metrics.journal_refused.labels(self._facade, write).inc()

    def message_refused(self, topic: str, reason: str) -> None:
        """Count a message the journal did not let act."""
        self._metrics.messages_refused.labels(self._facade, topic, reason).inc()

    def admission_refused(self, cause: str) -> None:
        """Count a call refused before it started, for `cause`."""
        self._metrics.calls_refused.labels(self._facade, cause).inc()

    def recovered(self, cause: str) -> None:
        """Count a stalled saga taken over by recovery."""
        self._metrics.sagas_recovered.labels(self._facade, cause).inc()

    def observe_step(self, step: str, seconds: float) -> None:
        """Record how long `step` took."""
        child = self._steps.get(step)
        if child is None:
            child = self._steps[step] = self._metrics.step_seconds.labels(self._facade, step)
        child.observe(seconds)


class Exposition(Protocol):
    """What `MetricsServer` serves: metrics in the Prometheus text format."""

    def exposition(self) -> bytes:
        """The metrics now."""


class WorkersMetrics:
    """Every worker's metrics, from the files they write in `path` (prometheus_client's
    multiprocess mode), as one exposition: counters and histograms summed over every worker
    that ever ran, gauges over the live ones (`orchestrator_broker_connected` per worker, with
    a `pid` label)."""

    def __init__(self, path: str) -> None:
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=path)  # type: ignore[no-untyped-call]

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)


class MetricsServer:
    """A minimal HTTP server answering `GET /metrics`, on asyncio (no threads)."""

    def __init__(self, metrics: Exposition, host: str, port: int) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self.port = 0
        """The bound port, once started."""

    async def start(self) -> int:
        """Listen; returns the bound port."""
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics served", extra={"address": f"{self._host}:{self.port}"})
        return self.port

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request_line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers: nothing in them changes the answer
            method, _, rest = request_line.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method == "GET" and path == METRICS_PATH:
                body = self._metrics.exposition()
                status, content_type = "200 OK", CONTENT_TYPE_LATEST
            else:
                body, status, content_type = b"not found\n", "404 Not Found", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass  # a client that hangs or goes away gets nothing more
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
