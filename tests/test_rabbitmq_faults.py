"""RabbitMQBroker under faults short of a broker crash: a silent link, RabbitMQ's flow control.

The tests share one private node for the module: the proxy breaks only a
test's own connection, and a test that raises the node's memory alarm clears
it again whatever happens.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from orchestrator.broker.base import BrokerUnavailable
from orchestrator.broker.rabbitmq import RabbitMQBroker
from tests.support.broker_fixtures import make_settings, memory_alarm
from tests.support.rabbitmq import RabbitMQNode
from tests.support.tcp_proxy import TcpProxy
from tests.test_rabbitmq_broker import health_changes, next_change, receive, recorder, running

pytestmark = pytest.mark.broker

TOPIC = "orders"
SLACK = 1.0  # what a loaded 2-core machine may add to a timer
EARLY = 0.05  # a timer may fire a hair before the caller's own clock says it is due


async def timed_publish(broker: RabbitMQBroker, message_id: str, **kwargs: float) -> float:
    """Seconds until `publish` raised BrokerUnavailable; fails the test if it returned."""
    began = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await broker.publish(TOPIC, b"{}", message_id=message_id, **kwargs)
    return time.monotonic() - began


@pytest.mark.timeout(60)
async def test_a_publish_on_a_silent_link_raises_within_its_own_shorter_timeout(
    module_rabbitmq: RabbitMQNode, rabbitmq_proxy: TcpProxy
) -> None:
    settings = make_settings(rabbitmq_proxy.url(module_rabbitmq.url), publish_timeout_seconds=10)
    async with running(settings) as broker:
        await broker.declare(TOPIC)
        rabbitmq_proxy.blackhole()

        elapsed = await timed_publish(broker, "short", timeout=0.5)

        assert 0.5 - EARLY <= elapsed < 0.5 + SLACK


@pytest.mark.timeout(60)
async def test_a_publish_timeout_longer_than_publish_timeout_seconds_is_capped_by_it(
    module_rabbitmq: RabbitMQNode, rabbitmq_proxy: TcpProxy
) -> None:
    settings = make_settings(rabbitmq_proxy.url(module_rabbitmq.url), publish_timeout_seconds=1)
    async with running(settings) as broker:
        await broker.declare(TOPIC)
        rabbitmq_proxy.blackhole()

        elapsed = await timed_publish(broker, "capped", timeout=30)

        assert 1 - EARLY <= elapsed < 1 + SLACK


@pytest.mark.timeout(60)
async def test_a_publish_with_no_time_left_raises_at_once(
    module_rabbitmq: RabbitMQNode, rabbitmq_proxy: TcpProxy
) -> None:
    settings = make_settings(rabbitmq_proxy.url(module_rabbitmq.url))
    async with running(settings) as broker:
        await broker.declare(TOPIC)

        elapsed = await timed_publish(broker, "late", timeout=0)

        assert elapsed < 0.1
        assert await broker.depth(TOPIC) == 0


@pytest.mark.timeout(120)
async def test_publishes_in_flight_on_a_half_open_link_fail_in_time_and_the_link_recovers(
    module_rabbitmq: RabbitMQNode, rabbitmq_proxy: TcpProxy
) -> None:
    timeout = 2.0
    settings = make_settings(
        rabbitmq_proxy.url(module_rabbitmq.url),
        heartbeat_seconds=2,
        publish_timeout_seconds=timeout,
    )
    async with running(settings) as broker:
        changes = health_changes(broker)
        await broker.declare(TOPIC)
        received, handler = recorder()
        await broker.subscribe(TOPIC, handler)

        publishes = [asyncio.create_task(timed_publish(broker, f"m{i}")) for i in range(20)]
        await asyncio.sleep(0)  # each is now queued for the socket, none confirmed
        rabbitmq_proxy.blackhole()
        elapsed = await asyncio.gather(*publishes)

        assert all(timeout - EARLY <= seconds < timeout + SLACK for seconds in elapsed), elapsed
        # (2 s heartbeat + 1) * 3 without a frame, and aiormq gives the link up.
        await next_change(changes, False, within=15)
        assert not broker.healthy

        rabbitmq_proxy.restore()
        await next_change(changes, True, within=30)
        assert broker.healthy
        await broker.publish(TOPIC, b"{}", message_id="after")
        assert (await receive(received)).message_id == "after"


# -- flow control: RabbitMQ blocks publishing connections during an alarm -------


@pytest.mark.timeout(60)
async def test_a_publish_blocked_by_a_memory_alarm_fails_fast_naming_the_reason(
    module_rabbitmq: RabbitMQNode,
) -> None:
    settings = make_settings(module_rabbitmq.url, publish_timeout_seconds=10)
    async with running(settings) as broker, memory_alarm(module_rabbitmq):
        await broker.declare(TOPIC)

        # The first publish is what makes RabbitMQ block the connection:
        # it is in flight when the block arrives.
        first = await timed_publish(broker, "first")
        began = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="low on memory"):
            await broker.publish(TOPIC, b"{}", message_id="second")
        second = time.monotonic() - began

        assert first < SLACK, first
        assert second < 0.1, second


@pytest.mark.timeout(60)
async def test_health_is_false_while_the_connection_is_blocked_and_true_once_unblocked(
    module_rabbitmq: RabbitMQNode,
) -> None:
    settings = make_settings(module_rabbitmq.url, publish_timeout_seconds=10)
    async with running(settings) as broker:
        changes = health_changes(broker)
        await broker.declare(TOPIC)
        async with memory_alarm(module_rabbitmq):
            with pytest.raises(BrokerUnavailable):
                await broker.publish(TOPIC, b"{}", message_id="blocked")
            await next_change(changes, False, within=5)
            assert not broker.healthy

        await next_change(changes, True, within=10)
        assert broker.healthy


@pytest.mark.timeout(60)
async def test_publishes_are_confirmed_and_consumed_again_once_the_alarm_clears(
    module_rabbitmq: RabbitMQNode,
) -> None:
    settings = make_settings(module_rabbitmq.url, publish_timeout_seconds=10)
    async with running(settings) as broker:
        changes = health_changes(broker)
        await broker.declare(TOPIC)
        received, handler = recorder()
        await broker.subscribe(TOPIC, handler)
        async with memory_alarm(module_rabbitmq):
            with pytest.raises(BrokerUnavailable):
                await broker.publish(TOPIC, b"{}", message_id="blocked")
        await next_change(changes, True, within=10)

        await broker.publish(TOPIC, b"{}", message_id="after", timeout=5)

        # The blocked publish may have reached RabbitMQ all the same (it
        # raised, so its caller would publish it again): at least once.
        seen = {(await receive(received)).message_id}
        if seen == {"blocked"}:
            seen.add((await receive(received)).message_id)
        assert "after" in seen


@pytest.mark.timeout(90)
async def test_the_connection_made_by_a_reconnect_is_watched_for_blocks_too(
    module_rabbitmq: RabbitMQNode, rabbitmq_proxy: TcpProxy
) -> None:
    settings = make_settings(rabbitmq_proxy.url(module_rabbitmq.url), publish_timeout_seconds=10)
    async with running(settings) as broker:
        changes = health_changes(broker)
        await broker.declare(TOPIC)
        async with memory_alarm(module_rabbitmq):
            with pytest.raises(BrokerUnavailable):
                await broker.publish(TOPIC, b"{}", message_id="blocked")
            await next_change(changes, False, within=5)

            rabbitmq_proxy.reset()
            # A new connection is not blocked until it publishes.
            await next_change(changes, True, within=30)
            elapsed = await timed_publish(broker, "blocked-again")
            assert elapsed < SLACK, elapsed
            assert not broker.healthy
