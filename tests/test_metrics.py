"""Prometheus metrics: sagas, steps, broker events, served over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from main import BookingApp
from main import running_app as run_booking_app
from orchestrator.config import MetricsSettings
from orchestrator.metrics import Metrics
from pb import booking_pb2, booking_pb2_grpc
from tests.support.app_fixtures import Upstreams, app_settings, eventually


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """The value of one sample, 0 when it was never recorded."""
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest.fixture
async def app(upstreams: Upstreams) -> AsyncIterator[BookingApp]:
    settings = app_settings(upstreams).model_copy(
        update={"metrics": MetricsSettings(enabled=True, host="127.0.0.1", port=0)}
    )
    async with run_booking_app(settings) as app:
        yield app


async def book(app: BookingApp, rid: str, *, fault: bool = False) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
        await booking_pb2_grpc.BookingServiceStub(channel).HandleSyncBooking(
            booking_pb2.BookingRequest(ProductID=1, FaultInject=fault),
            metadata=(("x-request-id", rid),),
            timeout=10,
        )


async def test_a_completed_sync_saga_counts_as_started_and_completed(app: BookingApp) -> None:
    metrics = app.orchestrator.metrics
    await book(app, "m1")

    labels = {"facade": "SyncBooking", "kind": "sync"}
    assert sample(metrics, "orchestrator_sagas_started_total", **labels) == 1
    assert sample(metrics, "orchestrator_sagas_completed_total", **labels) == 1
    assert sample(metrics, "orchestrator_sagas_in_flight", **labels) == 0


async def test_each_step_is_timed(app: BookingApp) -> None:
    await book(app, "m2")

    for step in ("create_order", "create_payment"):
        count = sample(
            app.orchestrator.metrics,
            "orchestrator_step_duration_seconds_count",
            facade="SyncBooking",
            step=step,
        )
        assert count == 1


async def test_a_failed_saga_counts_its_status_and_then_its_compensation(app: BookingApp) -> None:
    metrics = app.orchestrator.metrics
    with pytest.raises(grpc.aio.AioRpcError):
        await book(app, "m3", fault=True)

    failed = sample(
        metrics,
        "orchestrator_sagas_failed_total",
        facade="SyncBooking",
        kind="sync",
        code="FAILED_PRECONDITION",
    )
    assert failed == 1

    async def compensated() -> bool:
        labels = {"facade": "SyncBooking", "kind": "sync"}
        return sample(metrics, "orchestrator_sagas_compensated_total", **labels) == 1

    await eventually(compensated)


async def test_the_broker_connection_is_a_gauge(app: BookingApp) -> None:
    assert sample(app.orchestrator.metrics, "orchestrator_broker_connected") == 1


async def test_dead_lettered_messages_are_counted(app: BookingApp) -> None:
    broker = app.orchestrator.broker
    await broker.publish("create_order", b"not json", message_id="poison")

    async def counted() -> bool:
        value = sample(
            app.orchestrator.metrics, "orchestrator_dead_lettered_total", topic="create_order"
        )
        return value == 1

    await eventually(counted)


async def http_get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    await writer.drain()
    raw = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    head, _, body = raw.partition("\r\n\r\n")
    return head.splitlines()[0], body


async def test_metrics_are_served_in_the_prometheus_text_format(app: BookingApp) -> None:
    await book(app, "m4")

    status, body = await http_get(app.server.metrics_port, "/metrics")

    assert status == "HTTP/1.1 200 OK"
    names = {family.name for family in text_string_to_metric_families(body)}
    assert {
        "orchestrator_sagas_started",
        "orchestrator_sagas_completed",
        "orchestrator_sagas_failed",
        "orchestrator_sagas_compensated",
        "orchestrator_sagas_in_flight",
        "orchestrator_step_duration_seconds",
        "orchestrator_redeliveries",
        "orchestrator_dead_lettered",
        "orchestrator_broker_connected",
    } <= names


async def test_other_paths_are_not_found(app: BookingApp) -> None:
    status, _ = await http_get(app.server.metrics_port, "/other")
    assert status == "HTTP/1.1 404 Not Found"
