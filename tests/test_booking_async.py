"""HandleAsyncBooking on a real RabbitMQ: every saga ends completed or compensated, once.

The upstream services run in the test's process so their ledgers can be read
directly; the orchestrator runs in process too, or as `python main.py` where
the test kills it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from main import BookingApp
from main import running_app as run_booking_app
from orchestrator.broker.rabbitmq import RabbitMQBroker
from orchestrator.config import BrokerSettings
from orchestrator.server import LIVENESS_SERVICE
from pb import booking_pb2, booking_pb2_grpc
from tests.support.app_fixtures import BOOKING_TOPICS, Upstreams, app_settings, eventually
from tests.support.broker_fixtures import make_settings
from tests.support.processes import free_port, start_main, wait_for_serving
from tests.support.rabbitmq import RabbitMQNode
from tests.support.sagas import Load, Outcome, kept_dead_letters
from topic import CANCEL_ASYNC_BOOKING, CREATE_ORDER, CREATE_PAYMENT

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]

TOPICS = BOOKING_TOPICS


async def queues_drained(settings: BrokerSettings) -> dict[str, int]:
    """Messages left in each topic's queue and dead-letter queue (empty dict: all drained)."""
    inspector = RabbitMQBroker(settings)
    await inspector.start()
    try:
        left = {}
        for topic in TOPICS:
            if depth := await inspector.depth(topic):
                left[topic] = depth
            if dead := await inspector.dead_letters(topic):
                left[f"{topic}.dlq"] = len(dead)
        return left
    finally:
        await inspector.close()


@pytest.fixture
async def async_app(
    upstreams: Upstreams, rabbit_settings: BrokerSettings
) -> AsyncIterator[BookingApp]:
    """The booking service in this process, on the shared RabbitMQ."""
    async with run_booking_app(app_settings(upstreams, rabbit_settings)) as app:
        yield app


@pytest.fixture
async def booking(async_app: BookingApp) -> AsyncIterator[booking_pb2_grpc.BookingServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{async_app.server.port}") as channel:
        yield booking_pb2_grpc.BookingServiceStub(channel)


async def test_a_booking_completes_with_a_created_order_and_a_paid_payment(
    booking: booking_pb2_grpc.BookingServiceAsyncStub, upstreams: Upstreams
) -> None:
    load = Load(size=1, fault_every=0)
    await load.submit(booking)

    await load.settle(upstreams.order.ledger, upstreams.payment.ledger)
    assert load.tally(upstreams.order.ledger, upstreams.payment.ledger)[Outcome.COMPLETED] == 1


async def test_fault_inject_cancels_the_order_and_takes_no_payment(
    booking: booking_pb2_grpc.BookingServiceAsyncStub, upstreams: Upstreams
) -> None:
    load = Load(size=1, fault_every=1)
    await load.submit(booking)

    await load.settle(upstreams.order.ledger, upstreams.payment.ledger)
    [rid] = load.request_ids
    assert upstreams.payment.ledger.latest_payment_of(rid) is None


async def test_500_concurrent_bookings_each_end_completed_or_compensated_once(
    booking: booking_pb2_grpc.BookingServiceAsyncStub,
    upstreams: Upstreams,
    rabbit_settings: BrokerSettings,
) -> None:
    load = Load(size=500, fault_every=5)
    await load.submit(booking, concurrency=64)

    await load.settle(upstreams.order.ledger, upstreams.payment.ledger)
    tally = load.tally(upstreams.order.ledger, upstreams.payment.ledger)
    assert tally[Outcome.COMPLETED] == 400 and tally[Outcome.COMPENSATED] == 100
    assert await queues_drained(rabbit_settings) == {}


async def test_invalid_requests_are_refused_before_anything_is_queued(
    booking: booking_pb2_grpc.BookingServiceAsyncStub, rabbit_settings: BrokerSettings
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await booking.HandleAsyncBooking(
            booking_pb2.BookingRequest(ProductID=0),
            metadata=(("x-request-id", "bad-1"),),
            timeout=5,
        )

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bad-1" in (failure.value.details() or "")
    assert await queues_drained(rabbit_settings) == {}


async def test_poison_messages_are_dead_lettered_with_their_reason_and_good_sagas_finish(
    async_app: BookingApp,
    booking: booking_pb2_grpc.BookingServiceAsyncStub,
    upstreams: Upstreams,
    rabbit_settings: BrokerSettings,
) -> None:
    slip = {"topics": [CREATE_ORDER, CREATE_PAYMENT], "rollback_topic": CANCEL_ASYNC_BOOKING}
    poison = {
        "malformed": b'{"request_id": "p-1", ',
        "schema": json.dumps({**slip, "request_id": "p-2", "product_id": "lots"}).encode(),
        "index": json.dumps(
            {**slip, "request_id": "p-3", "product_id": 1, "current_index": 9}
        ).encode(),
    }
    load = Load(size=40, fault_every=4)
    publisher = RabbitMQBroker(rabbit_settings)
    await publisher.start()
    try:
        submitting = asyncio.create_task(load.submit(booking))
        for name, body in poison.items():
            await publisher.publish(CREATE_ORDER, body, message_id=f"poison-{name}")
        await submitting
        await load.settle(upstreams.order.ledger, upstreams.payment.ledger)
        dead = await kept_dead_letters(async_app.orchestrator, [CREATE_ORDER], 3)
    finally:
        await publisher.close()

    reasons = {message_id: letter.reason for message_id, letter in dead.items()}
    assert reasons["poison-malformed"].startswith("malformed JSON")
    assert reasons["poison-schema"].startswith("schema: product_id")
    assert reasons["poison-index"].startswith("no such saga")
    assert len(dead) == 3
    assert await queues_drained(rabbit_settings) == {}


async def test_the_broker_restarted_mid_run_loses_nothing(
    private_rabbitmq: RabbitMQNode, upstreams: Upstreams
) -> None:
    settings = make_settings(private_rabbitmq.url)
    load = Load(size=500, fault_every=5)
    async with (
        run_booking_app(app_settings(upstreams, settings)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel,
    ):
        stub = booking_pb2_grpc.BookingServiceStub(channel)
        submitting = asyncio.create_task(load.submit(stub, concurrency=32, retry_for=120))
        await asyncio.wait_for(load.accepted_at_least(150), 60)
        await private_rabbitmq.astop()
        await asyncio.sleep(1)
        await private_rabbitmq.astart()
        await submitting
        await load.settle(upstreams.order.ledger, upstreams.payment.ledger, within=120)

    tally = load.tally(upstreams.order.ledger, upstreams.payment.ledger)
    assert tally[Outcome.COMPLETED] == 400 and tally[Outcome.COMPENSATED] == 100
    assert await queues_drained(settings) == {}


def orchestrator_config(tmp_path: Path, upstreams: Upstreams, settings: BrokerSettings) -> Path:
    """An app.yaml for `python main.py` on a free port, this test's broker and upstreams."""
    config = {
        "grpc": {"host": "127.0.0.1", "port": free_port(), "shutdown_grace_seconds": 2},
        "broker": {
            "url": settings.url.get_secret_value(),
            "topic_prefix": settings.topic_prefix,
            "connect_timeout_seconds": 20,
        },
        "upstreams": {
            "order": {"address": upstreams.order.target},
            "payment": {"address": upstreams.payment.target},
        },
        "embedded_upstreams": {},
        # The journal outlives the process: the restarted orchestrator goes on from it.
        "store": {"url": f"sqlite+aiosqlite:///{tmp_path / 'orchestrator.db'}"},
        "log_level": "WARNING",
    }
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def test_the_orchestrator_killed_mid_run_loses_nothing_and_does_nothing_twice(
    tmp_path: Path, upstreams: Upstreams, rabbit_settings: BrokerSettings
) -> None:
    config = orchestrator_config(tmp_path, upstreams, rabbit_settings)
    port = yaml.safe_load(config.read_text())["grpc"]["port"]
    target = f"127.0.0.1:{port}"
    load = Load(size=500, fault_every=5)
    first = start_main(config=config)
    try:
        await asyncio.to_thread(wait_for_serving, target, first)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = booking_pb2_grpc.BookingServiceStub(channel)
            submitting = asyncio.create_task(load.submit(stub, concurrency=32, retry_for=120))
            await asyncio.wait_for(load.accepted_at_least(200), 60)
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
            with start_main(config=config) as second:
                await asyncio.to_thread(wait_for_serving, target, second)
                await submitting
                await load.settle(upstreams.order.ledger, upstreams.payment.ledger, within=120)
    finally:
        first.close()

    tally = load.tally(upstreams.order.ledger, upstreams.payment.ledger)
    assert tally[Outcome.COMPLETED] == 400 and tally[Outcome.COMPENSATED] == 100
    assert await queues_drained(rabbit_settings) == {}


async def test_health_follows_the_broker_and_async_bookings_are_refused_while_it_is_down(
    private_rabbitmq: RabbitMQNode, upstreams: Upstreams
) -> None:
    settings = make_settings(private_rabbitmq.url, publish_timeout_seconds=1.0)
    async with (
        run_booking_app(app_settings(upstreams, settings)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        stub = booking_pb2_grpc.BookingServiceStub(channel)

        async def status() -> int:
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            return answer.status

        assert await status() == health_pb2.HealthCheckResponse.SERVING
        await private_rabbitmq.astop()
        await eventually(
            lambda: _equals(status(), health_pb2.HealthCheckResponse.NOT_SERVING), within=20
        )
        liveness = await health.Check(
            health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=2
        )
        assert liveness.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.HandleAsyncBooking(
                booking_pb2.BookingRequest(ProductID=1),
                metadata=(("x-request-id", "while-down"),),
                timeout=10,
            )
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "while-down" in (failure.value.details() or "")

        await private_rabbitmq.astart()
        await eventually(
            lambda: _equals(status(), health_pb2.HealthCheckResponse.SERVING), within=30
        )
        load = Load(size=5, fault_every=0)
        await load.submit(stub)
        await load.settle(upstreams.order.ledger, upstreams.payment.ledger)
    assert upstreams.order.ledger.latest_order_of("while-down") is None


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_broker_password_never_reaches_the_log_of_a_failing_start(
    tmp_path: Path, log_format: str
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    config = tmp_path / "app.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "grpc": {"host": "127.0.0.1", "port": free_port()},
                "broker": {
                    "url": f"amqp://orchestrator:{password}@127.0.0.1:{free_port()}/",
                    "connect_timeout_seconds": 2,
                },
                "embedded_upstreams": {},
                "log_level": "DEBUG",
                "log_format": log_format,
            }
        )
    )
    with start_main(config=config) as process:
        assert process.wait(30) == 1
        output = process.output()

    assert "unreachable" in output
    assert "orchestrator:***@127.0.0.1" in output
    assert password not in output
