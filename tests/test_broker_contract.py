"""The broker contract (`orchestrator.broker.base`) on every real broker: RabbitMQ, NATS JetStream.

Each behaviour runs once per broker (`broker_kind`). Tests on the shared
server use a unique topic prefix each and delete what they declared; tests
that stop, kill or restart a server share one private server of that kind
for the module, and leave it running whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime

import pytest

from orchestrator.broker import broker_from_settings
from orchestrator.broker.base import (
    Broker,
    BrokerUnavailable,
    DeadLetter,
    DeadLetteredMessage,
    Delivery,
    UnroutableError,
)
from orchestrator.config import BrokerSettings, TopicSettings
from tests.support.broker_checks import (
    assert_not_logged,
    collect_dead_letters,
    health_changes,
    next_change,
    receive,
    recorder,
)
from tests.support.broker_fixtures import make_settings
from tests.support.brokers import BrokerKit, PrivateNode

pytestmark = pytest.mark.broker

TOPIC = "orders"


@asynccontextmanager
async def running(settings: BrokerSettings) -> AsyncIterator[Broker]:
    """A started broker of the kind `settings`' URL names, closed on exit."""
    broker = broker_from_settings(settings)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()


@asynccontextmanager
async def cleaned(kit: BrokerKit, settings: BrokerSettings) -> AsyncIterator[None]:
    """Delete what `settings`' prefix declared on `kit`'s server afterwards."""
    try:
        yield
    finally:
        await kit.delete(settings, frozenset({TOPIC}))


@asynccontextmanager
async def node_left_running(node: PrivateNode) -> AsyncIterator[None]:
    try:
        yield
    finally:
        if not node.running:
            await node.astart()


# -- delivery ------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_publish_then_consume_round_trips_body_message_id_and_headers(
    kit_broker: Broker,
) -> None:
    await kit_broker.declare(TOPIC)
    received, handler = recorder()
    await kit_broker.subscribe(TOPIC, handler)

    await kit_broker.publish(
        TOPIC, b'{"id": 1}', message_id="m-1", headers={"request-id": "r-1", "step": "pay"}
    )

    delivery = await receive(received)
    assert delivery == Delivery(
        topic=TOPIC,
        body=b'{"id": 1}',
        message_id="m-1",
        headers={"request-id": "r-1", "step": "pay"},
        delivery_count=1,
    )


@pytest.mark.timeout(30)
async def test_message_published_before_anyone_consumes_is_kept(kit_broker: Broker) -> None:
    await kit_broker.declare(TOPIC)
    await kit_broker.publish(TOPIC, b"{}", message_id="early")
    assert await kit_broker.depth(TOPIC) == 1  # type: ignore[attr-defined]

    received, handler = recorder()
    await kit_broker.subscribe(TOPIC, handler)

    assert (await receive(received)).message_id == "early"


@pytest.mark.timeout(30)
async def test_publish_to_undeclared_topic_raises_unroutable(kit_broker: Broker) -> None:
    with pytest.raises(UnroutableError):
        await kit_broker.publish("never-declared", b"{}", message_id="lost")


@pytest.mark.timeout(30)
async def test_body_over_max_message_bytes_raises_value_error(kit_broker: Broker) -> None:
    await kit_broker.declare(TOPIC)
    too_big = b"x" * (BrokerSettings().max_message_bytes + 1)
    with pytest.raises(ValueError, match="max_message_bytes"):
        await kit_broker.publish(TOPIC, too_big, message_id="big")
    assert await kit_broker.depth(TOPIC) == 0  # type: ignore[attr-defined]


# -- dead-lettering ------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_handler_raising_dead_letter_moves_message_to_dlq_with_reason(
    kit_broker: Broker,
) -> None:
    await kit_broker.declare(TOPIC)

    async def reject(delivery: Delivery) -> None:
        raise DeadLetter("amount must be positive")

    await kit_broker.subscribe(TOPIC, reject)
    await kit_broker.publish(TOPIC, b'{"amount": -1}', message_id="neg")

    [dead] = await collect_dead_letters(kit_broker, TOPIC, 1)
    assert (dead.topic, dead.body, dead.message_id, dead.reason) == (
        TOPIC,
        b'{"amount": -1}',
        "neg",
        "amount must be positive",
    )
    # Reconnecting gives back anything left unacknowledged: the topic must stay empty.
    await kit_broker.close()
    await kit_broker.start()
    assert await kit_broker.depth(TOPIC) == 0  # type: ignore[attr-defined]


async def test_a_dead_letter_carries_its_id_time_and_delivery_count(kit_broker: Broker) -> None:
    await kit_broker.declare(TOPIC)

    async def reject(delivery: Delivery) -> None:
        raise DeadLetter("no")

    await kit_broker.subscribe(TOPIC, reject)
    before = datetime.now(UTC)
    await kit_broker.publish(TOPIC, b"{}", message_id="m-1", headers={"traceparent": "t"})

    [dead] = await collect_dead_letters(kit_broker, TOPIC, 1)
    assert len(dead.id) == 32
    assert dead.delivery_count == 1
    assert dead.dead_lettered_at is not None
    assert before <= dead.dead_lettered_at <= datetime.now(UTC)
    assert dead.headers["traceparent"] == "t"
    assert "x-delivery-count" not in dead.headers
    assert not any(name.startswith("Nats-") for name in dead.headers)


async def test_a_dead_letter_whose_keeper_fails_stays_in_the_broker(kit_broker: Broker) -> None:
    await kit_broker.declare(TOPIC)

    async def reject(delivery: Delivery) -> None:
        raise DeadLetter("no")

    await kit_broker.subscribe(TOPIC, reject)
    await kit_broker.publish(TOPIC, b"{}", message_id="m-2")
    offered: list[DeadLetteredMessage] = []

    async def broken(letter: DeadLetteredMessage) -> None:
        offered.append(letter)
        raise RuntimeError("the store is down")

    async with asyncio.timeout(10):
        while not offered:
            with suppress(RuntimeError):
                await kit_broker.take_dead_letters(TOPIC, broken, limit=10)
            await asyncio.sleep(0.05)

    [again] = await collect_dead_letters(kit_broker, TOPIC, 1)
    assert (again.message_id, again.id) == ("m-2", offered[0].id)


@pytest.mark.timeout(30)
async def test_always_failing_handler_is_dead_lettered_after_delivery_limit_deliveries(
    broker_kit: BrokerKit,
) -> None:
    settings = broker_kit.settings(delivery_limit=3)
    attempts: list[int] = []
    handled_ok = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        if delivery.message_id == "good":
            handled_ok.set()
            return
        attempts.append(delivery.delivery_count)
        raise RuntimeError("downstream exploded")

    async with cleaned(broker_kit, settings):
        async with running(settings) as broker:
            await broker.declare(TOPIC)
            await broker.subscribe(TOPIC, handler)
            await broker.publish(TOPIC, b"{}", message_id="poison")
            await broker.publish(TOPIC, b"{}", message_id="good")

            [dead] = await collect_dead_letters(broker, TOPIC, 1)
            async with asyncio.timeout(5):
                await handled_ok.wait()  # the failing message did not stop the consumer
            assert dead.message_id == "poison"
            assert "delivery limit 3 reached" in dead.reason
            assert "downstream exploded" in dead.reason
            assert attempts == [1, 2, 3]
        async with running(settings) as broker:
            assert await broker.depth(TOPIC) == 0  # type: ignore[attr-defined]


@pytest.mark.timeout(30)
async def test_a_handler_failing_for_the_broker_is_retried_without_spending_the_delivery_limit(
    broker_kit: BrokerKit,
) -> None:
    settings = broker_kit.settings(delivery_limit=2)
    attempts = 0
    handled = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        nonlocal attempts
        attempts += 1
        if attempts <= 4:
            raise BrokerUnavailable("publish channel not restored yet")
        handled.set()

    async with cleaned(broker_kit, settings), running(settings) as broker:
        await broker.declare(TOPIC)
        await broker.subscribe(TOPIC, handler)
        await broker.publish(TOPIC, b"{}", message_id="outage")
        async with asyncio.timeout(20):
            await handled.wait()
        assert attempts == 5
        assert await broker.dead_letters(TOPIC) == []  # type: ignore[attr-defined]


@pytest.mark.timeout(30)
async def test_an_in_place_retry_after_broker_unavailable_is_marked_retried_and_redelivered(
    kit_broker: Broker,
) -> None:
    received: list[Delivery] = []
    handled = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        received.append(delivery)
        if len(received) == 1:
            raise BrokerUnavailable("outcome publish failed")
        handled.set()

    await kit_broker.declare(TOPIC)
    await kit_broker.subscribe(TOPIC, handler)
    await kit_broker.publish(TOPIC, b"{}", message_id="retry-me")
    async with asyncio.timeout(10):
        await handled.wait()
    first, retry = received
    assert (first.delivery_count, first.retried, first.redelivered) == (1, False, False)
    assert (retry.delivery_count, retry.retried, retry.redelivered) == (1, True, True)


# -- concurrency ---------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_concurrency_n_runs_n_handlers_at_once_and_no_more(broker_kit: BrokerKit) -> None:
    n, total = 4, 12
    settings = broker_kit.settings(topics={TOPIC: TopicSettings(concurrency=n)})
    active = peak = done = 0
    saturated, release, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        nonlocal active, peak, done
        active += 1
        peak = max(peak, active)
        if active == n:
            saturated.set()
        await release.wait()
        active -= 1
        done += 1
        if done == total:
            finished.set()

    async with cleaned(broker_kit, settings), running(settings) as broker:
        await broker.declare(TOPIC)
        await asyncio.gather(
            *(broker.publish(TOPIC, b"{}", message_id=f"m{i}") for i in range(total))
        )
        await broker.subscribe(TOPIC, handler)
        async with asyncio.timeout(10):
            await saturated.wait()
        # The rest are still waiting in the broker: they were not handed out.
        assert await broker.depth(TOPIC) == total - n  # type: ignore[attr-defined]
        assert peak == n
        release.set()
        async with asyncio.timeout(10):
            await finished.wait()
        assert peak == n


@pytest.mark.timeout(60)
async def test_200_concurrent_publishes_are_confirmed_and_consumed_exactly_once(
    kit_broker: Broker,
) -> None:
    total = 200
    await kit_broker.declare(TOPIC)
    seen: list[str] = []
    all_seen = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.message_id)
        if len(set(seen)) == total:
            all_seen.set()

    await kit_broker.subscribe(TOPIC, handler)
    ids = {f"m{i}" for i in range(total)}
    await asyncio.gather(*(kit_broker.publish(TOPIC, b"{}", message_id=i) for i in ids))

    async with asyncio.timeout(20):
        await all_seen.wait()
    assert set(seen) == ids
    assert len(seen) == total
    # Nothing left behind or redelivered once every handler has been acknowledged.
    await kit_broker.close()
    await kit_broker.start()
    assert await kit_broker.depth(TOPIC) == 0  # type: ignore[attr-defined]
    assert len(seen) == total


@pytest.mark.timeout(30)
async def test_close_cancels_a_stuck_handler_and_its_message_is_redelivered(
    broker_kit: BrokerKit,
) -> None:
    settings = broker_kit.settings()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(delivery: Delivery) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with cleaned(broker_kit, settings):
        broker = broker_kit.broker(settings, CLOSE_GRACE_SECONDS=0.2)
        await broker.start()
        await broker.declare(TOPIC)
        await broker.subscribe(TOPIC, stuck)
        await broker.publish(TOPIC, b"{}", message_id="slow")
        async with asyncio.timeout(10):
            await started.wait()
        began = time.monotonic()
        await broker.close()
        assert time.monotonic() - began < 3
        assert cancelled.is_set()
        assert not broker.healthy

        received, handler = recorder()
        async with running(settings) as again:
            await again.subscribe(TOPIC, handler)
            delivery = await receive(received)
        assert delivery.message_id == "slow"
        assert delivery.redelivered


# -- failures of the broker itself (the module's private server) --------------------


@pytest.mark.timeout(90)
async def test_messages_survive_a_restart_of_the_server(private_node: PrivateNode) -> None:
    settings = make_settings(private_node.url)
    async with node_left_running(private_node), running(settings) as broker:
        changes = health_changes(broker)
        await broker.declare(TOPIC)
        for i in range(3):
            await broker.publish(TOPIC, f'{{"n": {i}}}'.encode(), message_id=f"m{i}")

        await private_node.astop()
        await next_change(changes, False, within=10)
        await private_node.astart()
        await next_change(changes, True, within=30)

        received, handler = recorder()
        await broker.subscribe(TOPIC, handler)
        got = [await receive(received) for _ in range(3)]
        assert sorted(d.message_id for d in got) == ["m0", "m1", "m2"]
        assert sorted(d.body for d in got) == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']


@pytest.mark.timeout(90)
async def test_publish_while_the_server_is_stopped_raises_broker_unavailable_within_the_timeout(
    private_node: PrivateNode,
) -> None:
    settings = make_settings(private_node.url, publish_timeout_seconds=2)
    async with node_left_running(private_node), running(settings) as broker:
        changes = health_changes(broker)
        await broker.declare(TOPIC)
        await private_node.astop()
        await next_change(changes, False, within=10)

        began = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await broker.publish(TOPIC, b"{}", message_id="while-down")
        assert time.monotonic() - began < settings.publish_timeout_seconds + 1


@pytest.mark.timeout(90)
async def test_health_follows_the_server_and_the_consumer_resumes_after_reconnect(
    private_node: PrivateNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = secrets.token_hex(16)
    user_url = await asyncio.to_thread(private_node.add_user, f"u{uuid.uuid4().hex[:8]}", password)
    settings = make_settings(user_url)
    async with node_left_running(private_node), running(settings) as broker:
        changes = health_changes(broker)
        assert broker.healthy
        await broker.declare(TOPIC)
        received, handler = recorder()
        await broker.subscribe(TOPIC, handler)
        await broker.publish(TOPIC, b"{}", message_id="before")
        assert (await receive(received)).message_id == "before"

        await private_node.astop()
        await next_change(changes, False, within=10)
        assert not broker.healthy
        await private_node.astart()
        await next_change(changes, True, within=30)
        assert broker.healthy

        await broker.publish(TOPIC, b"{}", message_id="after")
        assert (await receive(received)).message_id == "after"
    # The reconnect path logs the URL too: it must be the censored one.
    assert_not_logged(password, caplog)


@pytest.mark.timeout(90)
async def test_start_keeps_retrying_until_the_server_comes_up(
    private_node: PrivateNode, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(private_node.url, connect_timeout_seconds=60)
    async with node_left_running(private_node):
        await private_node.astop()
        broker = broker_from_settings(settings)
        starting = asyncio.create_task(broker.start())
        await private_node.astart()
        try:
            async with asyncio.timeout(30):
                await starting
            assert broker.healthy
            assert "broker unreachable, retrying" in caplog.text
        finally:
            starting.cancel()
            await broker.close()


@pytest.mark.timeout(90)
async def test_durable_messages_survive_a_sigkill_of_the_server(private_node: PrivateNode) -> None:
    settings = make_settings(private_node.url)
    async with node_left_running(private_node):
        async with running(settings) as broker:
            await broker.declare(TOPIC)
            for i in range(5):
                await broker.publish(TOPIC, b"{}", message_id=f"k{i}")
            await private_node.akill()
        await private_node.astart()

        # Consume rather than check depth(): a quorum queue still recovering
        # right after the restart reports 0 messages for a moment.
        async with running(settings) as broker:
            received, handler = recorder()
            await broker.subscribe(TOPIC, handler)
            got = {(await receive(received)).message_id for _ in range(5)}
        assert got == {f"k{i}" for i in range(5)}
