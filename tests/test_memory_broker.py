"""InMemoryBroker: the parts of the broker contract the facade tests do not pin down."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.broker.base import BrokerUnavailable, Delivery
from orchestrator.broker.memory import InMemoryBroker
from orchestrator.config import BrokerSettings

TOPIC = "orders"


async def started() -> InMemoryBroker:
    broker = InMemoryBroker(BrokerSettings(redelivery_delay_seconds=0.001))
    await broker.start()
    return broker


@pytest.mark.timeout(10)
async def test_a_first_delivery_is_neither_retried_nor_redelivered() -> None:
    broker = await started()
    received: asyncio.Queue[Delivery] = asyncio.Queue()

    async def handler(delivery: Delivery) -> None:
        received.put_nowait(delivery)

    try:
        await broker.subscribe(TOPIC, handler)
        await broker.publish(TOPIC, b"{}", message_id="m")
        async with asyncio.timeout(5):
            delivery = await received.get()
        assert (delivery.delivery_count, delivery.retried, delivery.redelivered) == (
            1,
            False,
            False,
        )
    finally:
        await broker.close()


@pytest.mark.timeout(10)
async def test_a_retry_after_broker_unavailable_is_marked_retried_and_redelivered() -> None:
    broker = await started()
    received: list[Delivery] = []
    handled = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        received.append(delivery)
        if len(received) == 1:
            raise BrokerUnavailable("outcome publish failed")
        handled.set()

    try:
        await broker.subscribe(TOPIC, handler)
        await broker.publish(TOPIC, b"{}", message_id="m")
        async with asyncio.timeout(5):
            await handled.wait()
            await broker.join()
        first, retry = received
        assert (first.retried, first.redelivered) == (False, False)
        # The limit is not spent: same count, but the engine must treat it as a redelivery.
        assert (retry.delivery_count, retry.retried, retry.redelivered) == (1, True, True)
        assert broker.dead_letters == []
    finally:
        await broker.close()


@pytest.mark.timeout(10)
async def test_a_redelivery_after_a_handler_error_is_counted_not_retried() -> None:
    broker = await started()
    received: list[Delivery] = []
    handled = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        received.append(delivery)
        if len(received) == 1:
            raise BrokerUnavailable("outcome publish failed")
        if len(received) == 2:
            raise RuntimeError("downstream exploded")
        handled.set()

    try:
        await broker.subscribe(TOPIC, handler)
        await broker.publish(TOPIC, b"{}", message_id="m")
        async with asyncio.timeout(5):
            await handled.wait()
        assert [(d.delivery_count, d.retried) for d in received] == [
            (1, False),
            (1, True),
            (2, False),
        ]
        assert received[-1].redelivered
    finally:
        await broker.close()


@pytest.mark.timeout(10)
async def test_publish_with_a_timeout_enqueues_at_once() -> None:
    broker = await started()
    try:
        await broker.declare(TOPIC)
        await broker.publish(TOPIC, b"{}", message_id="m", timeout=0.5)
        assert broker.depth(TOPIC) == 1
    finally:
        await broker.close()


@pytest.mark.timeout(10)
async def test_publish_with_no_time_left_raises_and_enqueues_nothing() -> None:
    broker = await started()
    try:
        await broker.declare(TOPIC)
        with pytest.raises(BrokerUnavailable):
            await broker.publish(TOPIC, b"{}", message_id="m", timeout=0)
        assert broker.depth(TOPIC) == 0
    finally:
        await broker.close()


@pytest.mark.timeout(10)
async def test_a_delivery_in_flight_when_consumers_are_dropped_goes_to_the_next_consumer() -> None:
    broker = await started()
    taken = asyncio.Event()
    received: asyncio.Queue[Delivery] = asyncio.Queue()

    async def dying(delivery: Delivery) -> None:
        taken.set()
        await asyncio.Event().wait()  # never acknowledges

    async def next_consumer(delivery: Delivery) -> None:
        received.put_nowait(delivery)

    try:
        await broker.subscribe(TOPIC, dying)
        await broker.publish(TOPIC, b"{}", message_id="m")
        async with asyncio.timeout(5):
            await taken.wait()
        broker.drop_consumers()
        await broker.close()
        await broker.start()
        await broker.subscribe(TOPIC, next_consumer)
        async with asyncio.timeout(5):
            delivery = await received.get()
            await broker.join()
        assert (delivery.message_id, delivery.delivery_count, delivery.redelivered) == (
            "m",
            2,
            True,
        )
    finally:
        await broker.close()


@pytest.mark.timeout(10)
async def test_a_delivery_waiting_to_be_redelivered_is_kept_when_consumers_are_dropped() -> None:
    broker = InMemoryBroker(BrokerSettings(redelivery_delay_seconds=30))
    await broker.start()
    failed = asyncio.Event()
    received: asyncio.Queue[Delivery] = asyncio.Queue()

    async def failing(delivery: Delivery) -> None:
        failed.set()
        raise RuntimeError("upstream down")

    async def next_consumer(delivery: Delivery) -> None:
        received.put_nowait(delivery)

    try:
        await broker.subscribe(TOPIC, failing)
        await broker.publish(TOPIC, b"{}", message_id="m")
        async with asyncio.timeout(5):
            await failed.wait()
        await broker.close()  # the redelivery was 30 s away
        await broker.start()
        await broker.subscribe(TOPIC, next_consumer)
        async with asyncio.timeout(5):
            delivery = await received.get()
        assert (delivery.message_id, delivery.delivery_count) == ("m", 2)
    finally:
        await broker.close()
