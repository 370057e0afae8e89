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
