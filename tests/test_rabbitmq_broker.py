"""What is RabbitMQ's own in RabbitMQBroker: x-death, channels, logins, queues deleted.

The broker contract itself is specified once for every broker in
`test_broker_contract.py`. Tests on the session broker use a unique topic
prefix each. Tests that stop or restart a broker share one private node for
the module, and leave it running whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import pytest

from orchestrator.broker import broker_from_settings
from orchestrator.broker.base import (
    BrokerUnavailable,
    Delivery,
)
from orchestrator.broker.rabbitmq import RabbitMQBroker
from orchestrator.config import BrokerSettings
from tests.support.broker_checks import (
    assert_not_logged,
    collect_dead_letters,
    health_changes,
    next_change,
    receive,
    recorder,
)
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


# -- dead-lettering ------------------------------------------------------------


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


# -- failures of the broker itself (private node) ------------------------------


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
