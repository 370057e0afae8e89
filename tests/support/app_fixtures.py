"""Fixtures that run the booking service and its upstreams on free ports, in the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from main import AppSettings, BookingApp, EmbeddedSettings, UpstreamSettings, UpstreamsSettings
from main import running_app as run_booking_app
from orchestrator.config import BrokerSettings, GrpcSettings
from pb import booking_pb2_grpc, order_pb2, order_pb2_grpc, payment_pb2, payment_pb2_grpc
from tests.support.broker_fixtures import delete_topology, make_settings
from tests.support.brokers import BrokerKit
from topic import (
    CANCEL_ASYNC_BOOKING,
    CANCEL_SYNC_BOOKING,
    CANCEL_THROTTLING_BOOKING,
    CREATE_ORDER,
    CREATE_PAYMENT,
    THROTTLING_CREATE_ORDER,
    THROTTLING_CREATE_PAYMENT,
)
from upstream.server import RunningUpstream, serve_upstream

BOOKING_TOPICS = (
    CREATE_ORDER,
    CREATE_PAYMENT,
    CANCEL_ASYNC_BOOKING,
    CANCEL_SYNC_BOOKING,
    THROTTLING_CREATE_ORDER,
    THROTTLING_CREATE_PAYMENT,
    CANCEL_THROTTLING_BOOKING,
)
"""Every topic the booking service consumes."""
LEDGER_WRITES = {
    "order": ("create_order", "cancel_order_by_key", "cancel_orders_of", "cancel_order"),
    "payment": (
        "create_payment",
        "refund_payment_by_key",
        "refund_payments_of",
        "refund_payment",
    ),
}
"""Every write of the upstream ledgers, by service."""


@dataclass
class Upstreams:
    """The demo upstream servers and clients to inspect their ledgers."""

    order: RunningUpstream
    payment: RunningUpstream
    order_stub: order_pb2_grpc.OrderServiceAsyncStub
    payment_stub: payment_pb2_grpc.PaymentServiceAsyncStub

    async def order_of(self, request_id: str) -> order_pb2.Order | None:
        """The order created for `request_id`, or None."""
        try:
            return await self.order_stub.GetOrder(
                order_pb2.GetOrderRequest(RequestID=request_id), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def payment_of(self, request_id: str) -> payment_pb2.Payment | None:
        """The payment taken for `request_id`, or None."""
        try:
            return await self.payment_stub.GetPayment(
                payment_pb2.GetPaymentRequest(RequestID=request_id), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 10.0, interval: float = 0.02
) -> None:
    """Wait until `check()` is true; fail the test after `within` seconds."""
    async with asyncio.timeout(within):
        # Polling on purpose: the state lives in another service, which sends no events.
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running_upstreams(*, latency_ms: float = 0) -> AsyncIterator[Upstreams]:
    """Order and Payment services on free ports with in-memory ledgers, each call taking
    `latency_ms`; stopped on exit."""
    order = await serve_upstream("order", port=0, latency_ms=latency_ms)
    payment = await serve_upstream("payment", port=0, latency_ms=latency_ms)
    order_channel = grpc.aio.insecure_channel(order.target)
    payment_channel = grpc.aio.insecure_channel(payment.target)
    try:
        yield Upstreams(
            order,
            payment,
            order_pb2_grpc.OrderServiceStub(order_channel),
            payment_pb2_grpc.PaymentServiceStub(payment_channel),
        )
    finally:
        await order_channel.close(None)
        await payment_channel.close(None)
        await order.stop(None)
        await payment.stop(None)


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    """Order and Payment services on free ports with in-memory ledgers."""
    async with running_upstreams() as running:
        yield running


def app_settings(upstreams: Upstreams, broker: BrokerSettings | None = None) -> AppSettings:
    """Settings for a booking service on a free port that calls `upstreams`."""
    return AppSettings.model_validate(
        {
            "grpc": GrpcSettings(host="127.0.0.1", port=0, shutdown_grace_seconds=1),
            "broker": broker or BrokerSettings(redelivery_delay_seconds=0.01),
            "upstreams": UpstreamsSettings(
                order=UpstreamSettings(address=upstreams.order.target),
                payment=UpstreamSettings(address=upstreams.payment.target),
                timeout_seconds=2,
            ),
            "embedded_upstreams": EmbeddedSettings(),
            # Dead letters reach the list within a fifth of a second, not the default 5 s.
            "dead_letters": {"interval_seconds": 0.2},
        }
    )


@pytest.fixture
async def booking_app(upstreams: Upstreams) -> AsyncIterator[BookingApp]:
    """The booking service with an in-memory broker, serving on a free port."""
    async with run_booking_app(app_settings(upstreams)) as app:
        yield app


@pytest.fixture
async def booking(
    booking_app: BookingApp,
) -> AsyncIterator[booking_pb2_grpc.BookingServiceAsyncStub]:
    """A client of the running booking service."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{booking_app.server.port}") as channel:
        yield booking_pb2_grpc.BookingServiceStub(channel)


@pytest.fixture
async def rabbit_settings(rabbitmq_url: str) -> AsyncIterator[BrokerSettings]:
    """Broker settings with a topic prefix of this test's own; the booking service's queues
    and exchanges go afterwards."""
    settings = make_settings(rabbitmq_url)
    yield settings
    await delete_topology(settings, frozenset(BOOKING_TOPICS))


@pytest.fixture
async def kit_settings(broker_kit: BrokerKit) -> AsyncIterator[BrokerSettings]:
    """Settings on the shared server of `broker_kind`, with a topic prefix of this test's own;
    the booking service's topology goes afterwards."""
    settings = broker_kit.settings()
    yield settings
    await broker_kit.delete(settings, frozenset(BOOKING_TOPICS))


@pytest.fixture
def calls(upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every write the upstream ledgers take, counted by method (replays included)."""
    counted: Counter[str] = Counter()
    for service, methods in LEDGER_WRITES.items():
        ledger = getattr(upstreams, service).ledger
        for name in methods:
            monkeypatch.setattr(ledger, name, _counting(counted, name, getattr(ledger, name)))
    return counted


def _counting(counted: Counter[str], name: str, write: Callable[..., Any]) -> Callable[..., Any]:
    def count(*args: Any, **kwargs: Any) -> Any:
        counted[name] += 1
        return write(*args, **kwargs)

    return count
