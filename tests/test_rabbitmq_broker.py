"""RabbitMQBroker against a real RabbitMQ: delivery, dead-lettering, concurrency, restarts, secrets.

Tests on the session broker use a unique topic prefix each. Tests that stop,
kill or restart a broker share one private node for the module, and leave it
running whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import pytest

from orchestrator.broker import broker_from_settings
from orchestrator.broker.base import (
    BrokerUnavailable,
    DeadLetter,
    DeadLetteredMessage,
    Delivery,
    UnroutableError,
)
from orchestrator.broker.rabbitmq import RabbitMQBroker
from orchestrator.config import BrokerSettings, TopicSettings
from tests.support.broker_fixtures import delete_topology, make_settings, skip_or_fail
from tests.support.rabbitmq import RabbitMQNode

pytestmark = pytest.mark.broker

TOPIC = "orders"


# -- helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitMQNode]:
    """One private node for every restart test in this module (each leaves it running)."""
    if not RabbitMQNode.available():
        skip_or_fail("private RabbitMQ node", ["no RabbitMQ install under /usr/lib/rabbitmq/bin"])
    private = RabbitMQNode()
    try:
        private.start()
        yield private
    finally:
        private.cleanup()


@asynccontextmanager
async def running(settings: BrokerSettings) -> AsyncIterator[RabbitMQBroker]:
    broker = RabbitMQBroker(settings)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()


@asynccontextmanager
async def node_left_running(node: RabbitMQNode) -> AsyncIterator[None]:
    try:
        yield
    finally:
        if not node.running:
            await node.astart()


def health_changes(broker: RabbitMQBroker) -> asyncio.Queue[bool]:
    changes: asyncio.Queue[bool] = asyncio.Queue()
    broker.add_health_listener(changes.put_nowait)
    return changes


async def next_change(changes: asyncio.Queue[bool], expected: bool, within: float) -> None:
    async with asyncio.timeout(within):
        while (await changes.get()) is not expected:
            pass


async def collect_dead_letters(
    broker: RabbitMQBroker, topic: str, count: int, within: float = 10
) -> list[DeadLetteredMessage]:
    # RabbitMQ gives no event for "a message reached the DLQ": poll it.
    found: list[DeadLetteredMessage] = []
    async with asyncio.timeout(within):
        while len(found) < count:
            found += await broker.dead_letters(topic)
            if len(found) < count:
                await asyncio.sleep(0.05)
    return found


def recorder() -> tuple[asyncio.Queue[Delivery], Callable[[Delivery], Awaitable[None]]]:
    received: asyncio.Queue[Delivery] = asyncio.Queue()

    async def handler(delivery: Delivery) -> None:
        received.put_nowait(delivery)

    return received, handler


async def receive(received: asyncio.Queue[Delivery], within: float = 10) -> Delivery:
    async with asyncio.timeout(within):
        return await received.get()


def assert_not_logged(secret: str, caplog: pytest.LogCaptureFixture) -> None:
    """Neither the formatted records (tracebacks included) nor any extra field holds `secret`."""
    # caplog.text holds every record as formatted when it was emitted, tracebacks
    # included; formatting again later can fail on library objects since torn down.
    assert secret not in caplog.text
    for record in caplog.records:
        for name, value in vars(record).items():
            try:
                text = repr(value)
            except Exception:  # some library objects cannot repr themselves half-closed
                continue
            assert secret not in text, f"{secret!r} leaked through {record.name}:{name}"


# -- delivery ------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_publish_then_consume_round_trips_body_message_id_and_headers(
    rabbitmq_broker: RabbitMQBroker,
) -> None:
    await rabbitmq_broker.declare(TOPIC)
    received, handler = recorder()
    await rabbitmq_broker.subscribe(TOPIC, handler)

    await rabbitmq_broker.publish(
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
async def test_message_published_before_anyone_consumes_is_kept(
    rabbitmq_broker: RabbitMQBroker,
) -> None:
    await rabbitmq_broker.declare(TOPIC)
    await rabbitmq_broker.publish(TOPIC, b"{}", message_id="early")
    assert await rabbitmq_broker.depth(TOPIC) == 1

    received, handler = recorder()
    await rabbitmq_broker.subscribe(TOPIC, handler)

    assert (await receive(received)).message_id == "early"


@pytest.mark.timeout(30)
async def test_publish_to_undeclared_topic_raises_unroutable(
    rabbitmq_broker: RabbitMQBroker,
) -> None:
    with pytest.raises(UnroutableError):
        await rabbitmq_broker.publish("never-declared", b"{}", message_id="lost")


@pytest.mark.timeout(30)
async def test_body_over_max_message_bytes_raises_value_error(
    rabbitmq_broker: RabbitMQBroker, broker_settings: BrokerSettings
) -> None:
    await rabbitmq_broker.declare(TOPIC)
    too_big = b"x" * (broker_settings.max_message_bytes + 1)
    with pytest.raises(ValueError, match="max_message_bytes"):
        await rabbitmq_broker.publish(TOPIC, too_big, message_id="big")
    assert await rabbitmq_broker.depth(TOPIC) == 0


# -- dead-lettering ------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_handler_raising_dead_letter_moves_message_to_dlq_with_reason(
    rabbitmq_broker: RabbitMQBroker,
) -> None:
    await rabbitmq_broker.declare(TOPIC)

    async def reject(delivery: Delivery) -> None:
        raise DeadLetter("amount must be positive")

    await rabbitmq_broker.subscribe(TOPIC, reject)
    await rabbitmq_broker.publish(TOPIC, b'{"amount": -1}', message_id="neg")

    [dead] = await collect_dead_letters(rabbitmq_broker, TOPIC, 1)
    assert (dead.topic, dead.body, dead.message_id, dead.reason) == (
        TOPIC,
        b'{"amount": -1}',
        "neg",
        "amount must be positive",
    )
    # Reconnecting requeues anything left unacknowledged: the queue must stay empty.
    await rabbitmq_broker.close()
    await rabbitmq_broker.start()
    assert await rabbitmq_broker.depth(TOPIC) == 0


async def test_a_dead_letter_carries_its_id_time_and_delivery_count(
    rabbitmq_broker: RabbitMQBroker,
) -> None:
    await rabbitmq_broker.declare(TOPIC)

    async def reject(delivery: Delivery) -> None:
        raise DeadLetter("no")

    await rabbitmq_broker.subscribe(TOPIC, reject)
    before = datetime.now(UTC)
    await rabbitmq_broker.publish(TOPIC, b"{}", message_id="m-1", headers={"traceparent": "t"})

    [dead] = await collect_dead_letters(rabbitmq_broker, TOPIC, 1)
    assert len(dead.id) == 32
    assert dead.delivery_count == 1
    assert dead.dead_lettered_at is not None
    assert before <= dead.dead_lettered_at <= datetime.now(UTC)
    assert dead.headers["traceparent"] == "t"
    assert "x-delivery-count" not in dead.headers


async def test_a_dead_letter_whose_keeper_fails_stays_in_the_broker(
    rabbitmq_broker: RabbitMQBroker,
) -> None:
    await rabbitmq_broker.declare(TOPIC)

    async def reject(delivery: Delivery) -> None:
        raise DeadLetter("no")

    await rabbitmq_broker.subscribe(TOPIC, reject)
    await rabbitmq_broker.publish(TOPIC, b"{}", message_id="m-2")
    offered: list[DeadLetteredMessage] = []

    async def broken(letter: DeadLetteredMessage) -> None:
        offered.append(letter)
        raise RuntimeError("the store is down")

    async with asyncio.timeout(10):
        while not offered:
            with contextlib.suppress(RuntimeError):
                await rabbitmq_broker.take_dead_letters(TOPIC, broken, limit=10)
            await asyncio.sleep(0.05)

    [again] = await collect_dead_letters(rabbitmq_broker, TOPIC, 1)
    assert (again.message_id, again.id) == ("m-2", offered[0].id)


@pytest.mark.timeout(30)
async def test_always_failing_handler_is_dead_lettered_after_delivery_limit_deliveries(
    rabbitmq_url: str,
) -> None:
    settings = make_settings(rabbitmq_url, delivery_limit=3)
    attempts: list[int] = []
    handled_ok = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        if delivery.message_id == "good":
            handled_ok.set()
            return
        attempts.append(delivery.delivery_count)
        raise RuntimeError("downstream exploded")

    try:
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
            assert await broker.depth(TOPIC) == 0
    finally:
        await delete_topology(settings, frozenset({TOPIC}))


@pytest.mark.timeout(30)
async def test_message_dead_lettered_by_rabbitmq_reports_its_x_death_reason(
    rabbitmq_url: str,
) -> None:
    # A consumer that never finishes (here: a raw client that always requeues)
    # leaves the quorum queue's own delivery limit as the backstop.
    settings = make_settings(rabbitmq_url, delivery_limit=1)
    try:
        async with running(settings) as broker:
            await broker.declare(TOPIC)
            await broker.publish(TOPIC, b"{}", message_id="stuck")
            connection = await aio_pika.connect(rabbitmq_url)
            async with connection:
                channel = await connection.channel()
                queue = await channel.get_queue(settings.queue_name(TOPIC), ensure=False)
                for _ in range(2):  # x-delivery-limit=1 allows two deliveries
                    message = await queue.get(timeout=5)
                    await message.nack(requeue=True)

            [dead] = await collect_dead_letters(broker, TOPIC, 1)
            assert (dead.message_id, dead.reason) == ("stuck", "delivery_limit")
    finally:
        await delete_topology(settings, frozenset({TOPIC}))


# -- concurrency ---------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_concurrency_n_runs_n_handlers_at_once_and_no_more(rabbitmq_url: str) -> None:
    n, total = 4, 12
    settings = make_settings(rabbitmq_url, topics={TOPIC: TopicSettings(concurrency=n)})
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

    try:
        async with running(settings) as broker:
            await broker.declare(TOPIC)
            await asyncio.gather(
                *(broker.publish(TOPIC, b"{}", message_id=f"m{i}") for i in range(total))
            )
            await broker.subscribe(TOPIC, handler)
            async with asyncio.timeout(10):
                await saturated.wait()
            # The rest are still ready in the queue: the prefetch held them back.
            assert await broker.depth(TOPIC) == total - n
            assert peak == n
            release.set()
            async with asyncio.timeout(10):
                await finished.wait()
            assert peak == n
    finally:
        await delete_topology(settings, frozenset({TOPIC}))


@pytest.mark.timeout(60)
async def test_200_concurrent_publishes_are_confirmed_and_consumed_exactly_once(
    rabbitmq_broker: RabbitMQBroker,
) -> None:
    total = 200
    await rabbitmq_broker.declare(TOPIC)
    seen: list[str] = []
    all_seen = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.message_id)
        if len(set(seen)) == total:
            all_seen.set()

    await rabbitmq_broker.subscribe(TOPIC, handler)
    ids = {f"m{i}" for i in range(total)}
    await asyncio.gather(*(rabbitmq_broker.publish(TOPIC, b"{}", message_id=i) for i in ids))

    async with asyncio.timeout(20):
        await all_seen.wait()
    assert set(seen) == ids
    assert len(seen) == total
    # Nothing left behind or redelivered once every handler has been acknowledged.
    await rabbitmq_broker.close()
    await rabbitmq_broker.start()
    assert await rabbitmq_broker.depth(TOPIC) == 0
    assert len(seen) == total


class QuickClose(RabbitMQBroker):
    CLOSE_GRACE_SECONDS = 0.2


@pytest.mark.timeout(30)
async def test_close_cancels_a_stuck_handler_and_its_message_is_redelivered(
    rabbitmq_url: str,
) -> None:
    settings = make_settings(rabbitmq_url)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(delivery: Delivery) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    try:
        broker = QuickClose(settings)
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
    finally:
        await delete_topology(settings, frozenset({TOPIC}))


# -- failures of the broker itself (private node) ------------------------------


@pytest.mark.timeout(90)
async def test_messages_survive_a_restart_of_the_node(node: RabbitMQNode) -> None:
    settings = make_settings(node.url)
    async with node_left_running(node), running(settings) as broker:
        changes = health_changes(broker)
        await broker.declare(TOPIC)
        for i in range(3):
            await broker.publish(TOPIC, f'{{"n": {i}}}'.encode(), message_id=f"m{i}")

        await node.astop()
        await next_change(changes, False, within=10)
        await node.astart()
        await next_change(changes, True, within=30)

        received, handler = recorder()
        await broker.subscribe(TOPIC, handler)
        got = [await receive(received) for _ in range(3)]
        assert sorted(d.message_id for d in got) == ["m0", "m1", "m2"]
        assert sorted(d.body for d in got) == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']


@pytest.mark.timeout(90)
async def test_publish_while_node_is_stopped_raises_broker_unavailable_within_the_timeout(
    node: RabbitMQNode,
) -> None:
    settings = make_settings(node.url, publish_timeout_seconds=2)
    async with node_left_running(node), running(settings) as broker:
        changes = health_changes(broker)
        await broker.declare(TOPIC)
        await node.astop()
        await next_change(changes, False, within=10)

        began = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await broker.publish(TOPIC, b"{}", message_id="while-down")
        assert time.monotonic() - began < settings.publish_timeout_seconds + 1


@pytest.mark.timeout(90)
async def test_health_follows_the_node_and_the_consumer_resumes_after_reconnect(
    node: RabbitMQNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = secrets.token_hex(16)
    user_url = await asyncio.to_thread(node.add_user, f"u{uuid.uuid4().hex[:8]}", password)
    settings = make_settings(user_url)
    async with node_left_running(node), running(settings) as broker:
        changes = health_changes(broker)
        assert broker.healthy
        await broker.declare(TOPIC)
        received, handler = recorder()
        await broker.subscribe(TOPIC, handler)
        await broker.publish(TOPIC, b"{}", message_id="before")
        assert (await receive(received)).message_id == "before"

        await node.astop()
        await next_change(changes, False, within=10)
        assert not broker.healthy
        await node.astart()
        await next_change(changes, True, within=30)
        assert broker.healthy

        await broker.publish(TOPIC, b"{}", message_id="after")
        assert (await receive(received)).message_id == "after"
    # The reconnect path logs the URL too: it must be the censored one.
    assert_not_logged(password, caplog)


@pytest.mark.timeout(90)
async def test_ack_on_a_channel_lost_to_a_reconnect_is_ignored_and_the_message_redelivered(
    node: RabbitMQNode, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(node.url)
    first_started, finish_first = asyncio.Event(), asyncio.Event()
    received: asyncio.Queue[Delivery] = asyncio.Queue()

    async def handler(delivery: Delivery) -> None:
        received.put_nowait(delivery)
        if not first_started.is_set():
            first_started.set()
            await finish_first.wait()  # still running when its channel goes away

    async with node_left_running(node), running(settings) as broker:
        changes = health_changes(broker)
        await broker.declare(TOPIC)
        await broker.subscribe(TOPIC, handler)
        await broker.publish(TOPIC, b"{}", message_id="in-flight")
        first = await receive(received)
        await node.arestart()
        await next_change(changes, True, within=30)

        again = await receive(received)  # requeued by the broker, consumer restored
        assert (first.message_id, again.message_id) == ("in-flight", "in-flight")
        assert not first.redelivered and again.redelivered
        finish_first.set()
        await broker.close()  # waits for the first handler, whose ack cannot land

    assert "settling a delivery failed" in caplog.text
    assert received.empty()


@pytest.mark.timeout(90)
async def test_start_keeps_retrying_until_the_node_comes_up(
    node: RabbitMQNode, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(node.url, connect_timeout_seconds=60)
    async with node_left_running(node):
        await node.astop()
        broker = RabbitMQBroker(settings)
        starting = asyncio.create_task(broker.start())
        await node.astart()
        try:
            async with asyncio.timeout(30):
                await starting
            assert broker.healthy
            assert "broker unreachable, retrying" in caplog.text
        finally:
            starting.cancel()
            await broker.close()


@pytest.mark.timeout(90)
async def test_durable_messages_survive_a_sigkill_of_the_node(node: RabbitMQNode) -> None:
    settings = make_settings(node.url)
    async with node_left_running(node):
        async with running(settings) as broker:
            await broker.declare(TOPIC)
            for i in range(5):
                await broker.publish(TOPIC, b"{}", message_id=f"k{i}")
            await node.akill()
        await node.astart()

        # Consume rather than check depth(): a quorum queue still recovering
        # right after the restart reports 0 messages for a moment.
        async with running(settings) as broker:
            received, handler = recorder()
            await broker.subscribe(TOPIC, handler)
            got = {(await receive(received)).message_id for _ in range(5)}
        assert got == {f"k{i}" for i in range(5)}


# -- secrets and wiring --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("special", [False, True], ids=["hex", "needs-quoting"])
async def test_the_password_never_appears_in_logs(
    rabbitmq_url: str, caplog: pytest.LogCaptureFixture, special: bool
) -> None:
    caplog.set_level(logging.DEBUG)
    password = secrets.token_hex(16) + ("@:/%?#" if special else "")
    quoted = quote(password, safe="")
    refused = f"amqp://guest:{quoted}@127.0.0.1:{_free_port()}/"
    parts = urlsplit(rabbitmq_url)
    wrong = urlunsplit(parts._replace(netloc=f"guest:{quoted}@{parts.hostname}:{parts.port}"))

    errors: list[BaseException] = []
    for url in (refused, wrong):
        broker = RabbitMQBroker(make_settings(url, connect_timeout_seconds=1.5))
        with pytest.raises(BrokerUnavailable) as raised:
            await broker.start()
        errors.append(raised.value)
        await broker.close()

    assert "***" in str(errors[0]) and "refused the login" in str(errors[1])
    for error in errors:
        chain: BaseException | None = error
        while chain is not None:
            assert password not in repr(chain) and quoted not in repr(chain)
            chain = chain.__cause__ or chain.__context__
    assert caplog.records, "expected the failed attempts to be logged"
    assert_not_logged(password, caplog)
    assert_not_logged(quoted, caplog)


def test_broker_from_settings_picks_rabbitmq_for_amqp() -> None:
    settings = BrokerSettings.model_validate({"url": "amqp://guest:guest@127.0.0.1:5672/"})
    assert isinstance(broker_from_settings(settings), RabbitMQBroker)


@pytest.mark.timeout(30)
async def test_a_handler_failing_for_the_broker_is_retried_without_spending_the_delivery_limit(
    rabbitmq_url: str,
) -> None:
    settings = make_settings(rabbitmq_url, delivery_limit=2)
    attempts = 0
    handled = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        nonlocal attempts
        attempts += 1
        if attempts <= 4:
            raise BrokerUnavailable("publish channel not restored yet")
        handled.set()

    try:
        async with running(settings) as broker:
            await broker.declare(TOPIC)
            await broker.subscribe(TOPIC, handler)
            await broker.publish(TOPIC, b"{}", message_id="outage")
            async with asyncio.timeout(20):
                await handled.wait()
            assert attempts == 5
            assert await broker.dead_letters(TOPIC) == []
    finally:
        await delete_topology(settings, frozenset({TOPIC}))


@pytest.mark.timeout(30)
async def test_an_in_place_retry_after_broker_unavailable_is_marked_retried_and_redelivered(
    rabbitmq_broker: RabbitMQBroker,
) -> None:
    received: list[Delivery] = []
    handled = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        received.append(delivery)
        if len(received) == 1:
            raise BrokerUnavailable("outcome publish failed")
        handled.set()

    await rabbitmq_broker.declare(TOPIC)
    await rabbitmq_broker.subscribe(TOPIC, handler)
    await rabbitmq_broker.publish(TOPIC, b"{}", message_id="retry-me")
    async with asyncio.timeout(10):
        await handled.wait()
    first, retry = received
    assert (first.delivery_count, first.retried, first.redelivered) == (1, False, False)
    assert (retry.delivery_count, retry.retried, retry.redelivered) == (1, True, True)


# -- a queue deleted behind the broker's back ----------------------------------


async def delete_queue(settings: BrokerSettings, topic: str) -> None:
    """Delete the topic's queue over a connection of its own, as an operator would."""
    connection = await aio_pika.connect(settings.url.get_secret_value(), timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(settings.queue_name(topic))


async def routed_to_the_queue(settings: BrokerSettings, topic: str) -> bool:
    """True when the topic's queue exists and a mandatory publish to the exchange reaches it.

    The probe message goes to the topic like any other, so a consumer sees it.
    """
    connection = await aio_pika.connect(settings.url.get_secret_value(), timeout=10)
    async with connection:
        channel = await connection.channel(on_return_raises=True)
        try:
            await channel.declare_queue(settings.queue_name(topic), passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        exchange = await channel.get_exchange(f"{settings.topic_prefix}orchestrator")
        try:
            await exchange.publish(
                aio_pika.Message(b"{}", message_id="probe"),
                routing_key=settings.queue_name(topic),
                mandatory=True,
            )
        except aio_pika.exceptions.PublishError:
            return False
    return True


@pytest.mark.timeout(60)
async def test_a_publish_to_a_declared_topic_whose_queue_was_deleted_declares_it_again(
    rabbitmq_broker: RabbitMQBroker, broker_settings: BrokerSettings
) -> None:
    await rabbitmq_broker.declare(TOPIC)
    await delete_queue(broker_settings, TOPIC)

    await rabbitmq_broker.publish(TOPIC, b"{}", message_id="after-delete", timeout=5)

    assert await rabbitmq_broker.depth(TOPIC) == 1
    assert await rabbitmq_broker.dead_letters(TOPIC) == []  # the DLQ is there too


@pytest.mark.timeout(60)
async def test_restoring_a_deleted_queue_retries_a_failed_declare_within_the_publish_timeout(
    rabbitmq_broker: RabbitMQBroker,
    broker_settings: BrokerSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await rabbitmq_broker.declare(TOPIC)
    await delete_queue(broker_settings, TOPIC)
    declare = rabbitmq_broker.declare
    failures = [BrokerUnavailable("declare failed")]

    async def flaky_declare(topic: str) -> None:
        if failures:
            raise failures.pop()
        await declare(topic)

    monkeypatch.setattr(rabbitmq_broker, "declare", flaky_declare)

    await rabbitmq_broker.publish(TOPIC, b"{}", message_id="after-retry", timeout=5)

    assert failures == []
    assert await rabbitmq_broker.depth(TOPIC) == 1


@pytest.mark.timeout(60)
async def test_a_queue_deleted_while_consumed_comes_back_bound_to_the_exchange(
    rabbitmq_broker: RabbitMQBroker, broker_settings: BrokerSettings
) -> None:
    await rabbitmq_broker.declare(TOPIC)
    received, handler = recorder()
    await rabbitmq_broker.subscribe(TOPIC, handler)

    await delete_queue(broker_settings, TOPIC)

    # Restored by the consumer's channel alone: nothing is published here.
    async with asyncio.timeout(15):
        while not await routed_to_the_queue(broker_settings, TOPIC):  # noqa: ASYNC110 (no event)
            await asyncio.sleep(0.2)
    assert (await receive(received)).message_id == "probe"


@pytest.mark.timeout(90)
async def test_publishes_after_the_consumed_queue_is_deleted_mid_stream_are_all_consumed(
    rabbitmq_broker: RabbitMQBroker, broker_settings: BrokerSettings
) -> None:
    await rabbitmq_broker.declare(TOPIC)
    received, handler = recorder()
    await rabbitmq_broker.subscribe(TOPIC, handler)
    started: dict[str, float] = {}
    ten_published = asyncio.Event()

    async def stream() -> None:
        for i in range(60):
            message_id = f"m{i}"
            started[message_id] = time.monotonic()
            while True:
                try:
                    await rabbitmq_broker.publish(TOPIC, b"{}", message_id=message_id, timeout=5)
                    break
                except BrokerUnavailable:
                    # Retried, as a caller would: RabbitMQ 3.10 now and then
                    # drops a connection publishing as the queue is deleted.
                    await asyncio.sleep(0.1)
            if i == 9:
                ten_published.set()
            await asyncio.sleep(0.01)

    publisher = asyncio.create_task(stream())
    try:
        async with asyncio.timeout(10):
            await ten_published.wait()
        await delete_queue(broker_settings, TOPIC)
        deleted = time.monotonic()
        async with asyncio.timeout(30):
            await publisher
    finally:
        publisher.cancel()

    # Those published before or during the deletion may be gone with the queue.
    after = {message_id for message_id, began in started.items() if began > deleted}
    assert len(after) > 20
    seen: set[str] = set()
    async with asyncio.timeout(15):
        while not after <= seen:
            seen.add((await received.get()).message_id)
    assert await routed_to_the_queue(broker_settings, TOPIC)
