"""RabbitMQ through aio-pika, with the semantics of `orchestrator.broker.base`.

Topology, all durable so that it and persistent messages survive a restart:

- one direct exchange `<prefix>orchestrator`; per topic a quorum queue named
  `settings.queue_name(topic)`, bound with that name as routing key, with a
  delivery limit and at-least-once dead-lettering to
- one direct exchange `<prefix>orchestrator.dlx`; per topic a quorum queue
  `<queue>.dlq` bound with the topic queue's name, which receives both the
  messages a handler dead-letters and those RabbitMQ dead-letters itself.

Publishing uses one channel with publisher confirms, `mandatory` and
`on_return_raises` (`_amqp_publisher`), so `publish` returns only once RabbitMQ
has the message on disk and raises when no queue took it. Each subscription
has its own channel with the topic's concurrency as prefetch, and runs every
delivery's handler in a task of its own (`_amqp_deliveries`).

A topic's queue deleted while the broker runs comes back: the consumer's
channel declares and binds it too, so aio-pika restores queue, binding and
consumer when RabbitMQ cancels the consumer; and a publish that finds a topic
it declared unroutable restores the topic (queue, binding, dead-letter queue,
consumers on new channels) and publishes once more, within its timeout.

Flow control: when RabbitMQ blocks the connection (`connection.blocked`, sent
while a memory or disk alarm is in effect), the broker reports itself
unhealthy and `publish` fails at once with BrokerUnavailable naming RabbitMQ's
reason, those in flight included, until RabbitMQ unblocks it. While blocked,
RabbitMQ reads nothing from the connection: declares, acks and nacks wait too
(each within its own timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import aio_pika
import aiormq
import aiormq.abc
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from aio_pika.exceptions import ChannelNotFoundEntity
from pamqp.common import FieldValue

from orchestrator.broker import _amqp_dead_letters
from orchestrator.broker._amqp_connection import (
    BROKER_ERRORS,
    ConsumerChannel,
    close_connection,
    connect,
    raw_channel,
    require,
)
from orchestrator.broker._amqp_deliveries import TOPIC_HEADER, Deliveries
from orchestrator.broker._amqp_publisher import Nacked, Publisher
from orchestrator.broker.base import (
    Broker,
    BrokerUnavailable,
    DeadLetteredMessage,
    DeadLetterKeeper,
    MessageHandler,
    QueueFull,
    UnroutableError,
)
from orchestrator.config import BrokerSettings

__all__ = ["TOPIC_HEADER", "RabbitMQBroker"]

log = logging.getLogger("orchestrator.broker.rabbitmq")


class RabbitMQBroker(Broker):
    """A `Broker` on RabbitMQ quorum queues; see the module docstring for the topology."""

    CLOSE_GRACE_SECONDS: ClassVar[float] = 5.0
    """How long `close()` lets in-flight handlers finish before cancelling them."""
    OUTAGE_RETRY_LIMIT: ClassVar[int] = 30
    """In-place retries of a handler that failed with BrokerUnavailable (about a minute)."""

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__()
        self._settings = settings
        prefix = settings.topic_prefix
        self._exchange_name = f"{prefix}orchestrator"
        self._dlx_name = f"{prefix}orchestrator.dlx"
        self._connection: AbstractRobustConnection | None = None
        self._publisher = Publisher(settings.safe_url)
        self._topology_channel: AbstractRobustChannel | None = None
        self._declared: set[str] = set()  # cache, cleared when a new connection starts
        self._registered: set[str] = set()  # topics the topology channel restores
        self._known_topics: set[str] = set()
        self._declare_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._subscriptions: list[_Subscription] = []
        self._repairs: dict[str, asyncio.Task[None]] = {}  # topic -> its queue being restored
        self._repaired: dict[str, int] = {}  # topic -> restorations so far
        self._deliveries = Deliveries(
            settings,
            dead_letter=self._publish_dead_letter,
            closing=lambda: self._closing,
            counted_redelivery=self._count_redelivery,
            counted_dead_letter=self._count_dead_letter,
            outage_retry_limit=self.OUTAGE_RETRY_LIMIT,
        )
        self._closing = False
        self._link_up = False  # connected, channels open

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Connect (retrying for `connect_timeout_seconds`), open channels, declare the exchanges.

        Raises BrokerUnavailable when RabbitMQ cannot be reached in time or
        refuses the credentials.
        """
        async with self._start_lock:
            if self._connection is not None:
                return
            self._closing = False
            self._declared.clear()
            self._registered.clear()
            connection = await connect(self._settings, self._on_flow_control)
            try:
                await self._open_channels(connection)
            except BaseException:
                await close_connection(connection)
                raise
            self._connection = connection
            connection.close_callbacks.add(self._on_connection_lost)
            connection.reconnect_callbacks.add(self._on_reconnected)
            log.info("connected to broker", extra={"url": self._settings.safe_url})
            self._link_up = True
            self._refresh_health()

    async def close(self) -> None:
        """Cancel consumers, let in-flight handlers finish briefly, then disconnect.

        Handlers still running after `CLOSE_GRACE_SECONDS` are cancelled; their
        deliveries were not acknowledged, so RabbitMQ requeues them.
        """
        connection = self._connection
        self._closing = True
        try:
            if connection is not None:
                for repair in list(self._repairs.values()):
                    repair.cancel()
                await self._cancel_consumers()
                await self._deliveries.drain(self.CLOSE_GRACE_SECONDS)
                await close_connection(connection)
        finally:
            self._connection = None
            self._publisher.channel = self._topology_channel = None
            self._subscriptions.clear()
            self._link_up = False
            self._publisher.block(None)
            self._refresh_health()

    # -- topology ----------------------------------------------------------

    async def declare(self, topic: str) -> None:
        """Declare the topic's quorum queue and dead-letter queue; cached, so cheap to repeat."""
        if topic in self._declared:
            return
        queue_name = self._settings.queue_name(topic)
        try:
            async with asyncio.timeout(self._settings.publish_timeout_seconds), self._declare_lock:
                if topic in self._declared:
                    return
                channel = require(self._topology_channel)
                # The first declare on this channel registers the queues with it,
                # to declare them again after a reconnect; a declare after a
                # deletion must not register them twice.
                robust = topic not in self._registered
                queue = await channel.declare_queue(
                    queue_name, durable=True, arguments=self._queue_arguments(topic), robust=robust
                )
                await queue.bind(self._exchange_name, routing_key=queue_name)
                dlq = await channel.declare_queue(
                    f"{queue_name}.dlq",
                    durable=True,
                    arguments={"x-queue-type": "quorum"},
                    robust=robust,
                )
                # Same routing key: RabbitMQ dead-letters with the original one.
                await dlq.bind(self._dlx_name, routing_key=queue_name)
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"cannot declare topic {topic!r}: {exc!r}") from exc
        self._declared.add(topic)
        self._registered.add(topic)
        self._known_topics.add(topic)

    @property
    def declared_topics(self) -> frozenset[str]:
        """Every topic this broker has declared, e.g. to delete their queues after a test."""
        return frozenset(self._known_topics)

    def _queue_arguments(self, topic: str) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-delivery-limit": self._settings.delivery_limit,
            "x-dead-letter-exchange": self._dlx_name,
            # at-least-once dead-lettering silently degrades to at-most-once
            # unless overflow is reject-publish; with a length limit, a publish
            # to a full queue is nacked (QueueFull), never a message dropped.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        max_length = self._settings.max_length_of(topic)
        if max_length is not None:
            arguments["x-max-length"] = max_length
        return arguments

    # -- publishing --------------------------------------------------------

    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (merged with publish_timeout_seconds)
    ) -> None:
        """Publish persistently and wait for the confirm, for `timeout` at most.

        Raises ValueError for a body over `max_message_bytes`, UnroutableError
        when the topic has no queue, BrokerUnavailable on a nack, a lost or
        silent connection, or no confirm within `timeout` (None:
        `publish_timeout_seconds`; otherwise the smaller of the two).
        """
        if len(body) > self._settings.max_message_bytes:
            raise ValueError(
                f"message of {len(body)} bytes exceeds max_message_bytes "
                f"({self._settings.max_message_bytes})"
            )
        limit = self._settings.publish_timeout_seconds
        timeout = limit if timeout is None else min(timeout, limit)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        exchange, routing_key = self._exchange_name, self._settings.queue_name(topic)
        fields: dict[str, FieldValue] = dict(headers or {})
        repaired = self._repaired.get(topic, 0)
        try:
            await self._publisher.publish(
                exchange, routing_key, body, message_id, fields, timeout=timeout
            )
        except Nacked as exc:
            # A quorum queue with reject-publish nacks a publish only when it is full.
            if self._settings.max_length_of(topic) is not None:
                raise QueueFull(
                    f"topic {topic!r} is full (its max_length): message {message_id} refused"
                ) from exc
            raise
        except UnroutableError:
            if topic not in self._known_topics:
                raise  # never declared: no queue is what the caller must hear about
            # Declared, yet unroutable: the queue was deleted behind our back.
            # Restore the topic and publish once more, within the same deadline.
            await self._await_restored(topic, repaired, deadline)
            await self._publisher.publish(
                exchange, routing_key, body, message_id, fields, timeout=deadline - loop.time()
            )

    async def _publish_dead_letter(
        self, topic: str, body: bytes, message_id: str, headers: dict[str, FieldValue]
    ) -> None:
        await self._publisher.publish(
            self._dlx_name,
            self._settings.queue_name(topic),
            body,
            message_id,
            headers,
            timeout=self._settings.publish_timeout_seconds,
        )

    # -- consuming ---------------------------------------------------------

    async def subscribe(self, topic: str, handler: MessageHandler) -> None:
        """Consume `topic` on a channel of its own, `concurrency_of(topic)` deliveries at once."""
        await self.declare(topic)
        subscription = _Subscription(topic, handler)
        await self._consume(subscription)
        self._subscriptions.append(subscription)
        log.info(
            "consuming",
            extra={"topic": topic, "concurrency": self._settings.concurrency_of(topic)},
        )

    async def _consume(self, subscription: _Subscription) -> None:
        topic, handler = subscription.topic, subscription.handler
        connection = require(self._connection)

        async def on_message(message: AbstractIncomingMessage) -> None:
            self._deliveries.dispatch(topic, handler, message)

        channel = connection.channel()
        if isinstance(channel, ConsumerChannel):
            channel.consumer_cancelled = functools.partial(self._consumer_cancelled, topic)
        try:
            async with asyncio.timeout(self._settings.publish_timeout_seconds):
                await channel.initialize()
                await channel.set_qos(prefetch_count=self._settings.concurrency_of(topic))
                # Declared and bound on this channel too, so that aio-pika restores
                # queue, binding and consumer together: after a reconnect, and
                # when RabbitMQ cancels the consumer because the queue was deleted
                # (unbound, a restored queue would receive nothing).
                queue_name = self._settings.queue_name(topic)
                queue = await channel.declare_queue(
                    queue_name, durable=True, arguments=self._queue_arguments(topic)
                )
                await queue.bind(self._exchange_name, routing_key=queue_name)
                tag = await queue.consume(on_message)
        except BROKER_ERRORS as exc:
            # A half-made robust channel would otherwise be restored forever.
            with contextlib.suppress(*BROKER_ERRORS):
                async with asyncio.timeout(2):
                    await channel.close()
            raise BrokerUnavailable(f"cannot subscribe to topic {topic!r}: {exc!r}") from exc
        subscription.consumer = (channel, queue, tag)

    def _consumer_cancelled(self, topic: str) -> None:
        """RabbitMQ cancelled a consumer of `topic` (its queue was deleted): restore it."""
        if self._closing or topic in self._repairs:
            return
        log.warning("topic's queue is gone, declaring it again", extra={"topic": topic})
        self._start_restoring(topic)

    def _start_restoring(self, topic: str) -> asyncio.Task[None]:
        repair = asyncio.get_running_loop().create_task(self._restore_topic(topic))
        self._repairs[topic] = repair
        repair.add_done_callback(self._repair_done)
        return repair

    async def _await_restored(self, topic: str, repaired: int, deadline: float) -> None:
        """Wait, until `deadline`, for the topic's queue to be restored; start that if needed.

        `repaired` is how many restorations the caller had seen when it
        published: if one finished since, the caller only needs to retry.
        """
        repair = self._repairs.get(topic)
        if repair is None:
            if self._repaired.get(topic, 0) != repaired:
                return
            log.warning("topic's queue is gone, declaring it again", extra={"topic": topic})
            repair = self._start_restoring(topic)
        try:
            async with asyncio.timeout_at(deadline):
                # Shielded: a publish giving up must not cut a restoration short.
                await asyncio.shield(repair)
        except TimeoutError as exc:
            raise BrokerUnavailable(f"topic {topic!r} not restored in time") from exc

    async def _restore_topic(self, topic: str) -> None:
        """Declare a topic whose queue was deleted again, and consume it on new channels.

        RabbitMQ (3.10) gives a quorum queue declared again, while a channel
        still consumes its deleted namesake, that channel's consumer back: a
        consumer that is handed messages and never passes them on. So this
        topic's consumer channels are closed first, and consume anew once the
        queue, its binding and its dead-letter queue are back.
        """
        subscriptions = [s for s in self._subscriptions if s.topic == topic]
        for subscription in subscriptions:
            await self._close_consumer(subscription)
        attempt = 0
        while True:
            # Until it succeeds (or `close()` cancels it): nothing else would
            # give the closed consumers back, publishes may route again.
            try:
                self._declared.discard(topic)
                await self.declare(topic)
                for subscription in subscriptions:
                    if subscription.consumer is None:
                        await self._consume(subscription)
                break
            except BrokerUnavailable as exc:
                attempt += 1
                log.warning(
                    "restoring a topic failed, retrying",
                    extra={"topic": topic, "attempt": attempt, "error": str(exc)},
                )
                await asyncio.sleep(min(0.5 * attempt, 5.0))
        self._repaired[topic] = self._repaired.get(topic, 0) + 1

    def _repair_done(self, repair: asyncio.Task[None]) -> None:
        topic = next((t for t, task in self._repairs.items() if task is repair), None)
        if topic is not None:
            del self._repairs[topic]
        if not repair.cancelled() and (exc := repair.exception()) is not None:
            log.error("restoring a topic failed", extra={"topic": topic, "error": repr(exc)})

    async def _close_consumer(self, subscription: _Subscription) -> None:
        if subscription.consumer is None:
            return
        channel, _queue, _tag = subscription.consumer
        subscription.consumer = None
        # Its deliveries in flight cannot be acknowledged any more; they
        # belonged to the deleted queue.
        with contextlib.suppress(*BROKER_ERRORS):
            async with asyncio.timeout(2):
                await channel.close()

    # -- ops helpers -------------------------------------------------------

    async def dead_letters(self, topic: str) -> list[DeadLetteredMessage]:
        """Drain the topic's dead-letter queue, returning its messages with their reasons.

        The reason is the handler's (`x-orchestrator-reason`) or, for messages
        RabbitMQ dead-lettered itself, its own (`x-first-death-reason`, such
        as `delivery_limit`). Raises BrokerUnavailable when disconnected.
        """
        drained: list[DeadLetteredMessage] = []

        async def keep(letter: DeadLetteredMessage) -> None:
            drained.append(letter)

        while await self.take_dead_letters(topic, keep, limit=1000):
            pass
        return drained

    async def take_dead_letters(self, topic: str, keep: DeadLetterKeeper, *, limit: int) -> int:
        """Get the topic's dead letters one by one (`basic.get`), acknowledging each once
        `keep` returned; a `keep` that raises sends its message back (and ends the round)."""
        queue_name = f"{self._settings.queue_name(topic)}.dlq"
        async with self._raw_channel() as channel:
            taken, failure = await _amqp_dead_letters.take(
                channel, queue_name, topic, keep, limit=limit
            )
        if failure is not None:
            # The keeper's failure, not the broker's: raised as it is.
            raise failure
        return taken

    async def depth(self, topic: str) -> int:
        """Messages ready in the topic's queue (0 when it does not exist).

        Unacknowledged deliveries are not counted, and right after a broker
        restart a quorum queue still recovering briefly reports 0.
        """
        async with self._raw_channel() as channel:
            try:
                declared = await channel.queue_declare(
                    self._settings.queue_name(topic), passive=True, timeout=5
                )
            except ChannelNotFoundEntity:
                return 0
        return declared.message_count or 0

    # -- internals ---------------------------------------------------------

    async def _open_channels(self, connection: AbstractRobustConnection) -> None:
        try:
            async with asyncio.timeout(self._settings.publish_timeout_seconds):
                publish_channel = connection.channel(publisher_confirms=True, on_return_raises=True)
                await publish_channel.initialize()
                topology_channel = connection.channel()
                await topology_channel.initialize()
                await publish_channel.declare_exchange(
                    self._exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
                )
                await publish_channel.declare_exchange(
                    self._dlx_name, aio_pika.ExchangeType.DIRECT, durable=True
                )
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"cannot open channels on {self._settings.safe_url}") from exc
        self._publisher.channel, self._topology_channel = publish_channel, topology_channel

    async def _cancel_consumers(self) -> None:
        # While disconnected a cancel would wait for the reconnect: bound them
        # all together; the deliveries go back with the connection anyway.
        cancels = [
            queue.cancel(tag)
            for subscription in self._subscriptions
            if subscription.consumer is not None
            for _channel, queue, tag in [subscription.consumer]
        ]
        with contextlib.suppress(*BROKER_ERRORS):
            async with asyncio.timeout(2):
                await asyncio.gather(*cancels, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def _raw_channel(self) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        async with raw_channel(require(self._connection), self._settings.safe_url) as channel:
            yield channel

    def _on_connection_lost(self, _sender: object, exc: BaseException | None) -> None:
        if self._closing:
            return
        log.warning(
            "broker connection lost, reconnecting",
            extra={"url": self._settings.safe_url, "error": repr(exc)},
        )
        self._link_up = False
        self._refresh_health()

    def _on_reconnected(self, _sender: object) -> None:
        log.info("broker connection restored", extra={"url": self._settings.safe_url})
        self._link_up = True
        self._refresh_health()

    def _on_flow_control(self, reason: str | None) -> None:
        """RabbitMQ blocked the connection for `reason`, or (None) unblocked it."""
        if not self._publisher.block(reason):
            return
        if reason is not None:
            log.warning(
                "broker blocked publishing",
                extra={"url": self._settings.safe_url, "reason": reason},
            )
        elif self._link_up:
            log.info("broker unblocked publishing", extra={"url": self._settings.safe_url})
        self._refresh_health()

    def _refresh_health(self) -> None:
        self._set_healthy(self._link_up and not self._publisher.blocked)


@dataclasses.dataclass(slots=True)
class _Subscription:
    """A topic consumed with a handler, and its consumer while it has one."""

    topic: str
    handler: MessageHandler
    consumer: tuple[AbstractRobustChannel, AbstractRobustQueue, str] | None = None
