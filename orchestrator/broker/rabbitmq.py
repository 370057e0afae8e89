"""RabbitMQ through aio-pika, with the semantics of `orchestrator.broker.base`.

Topology, all durable so that it and persistent messages survive a restart:

- one direct exchange `<prefix>orchestrator`; per topic a quorum queue named
  `settings.queue_name(topic)`, bound with that name as routing key, with a
  delivery limit and at-least-once dead-lettering to
- one direct exchange `<prefix>orchestrator.dlx`; per topic a quorum queue
  `<queue>.dlq` bound with the topic queue's name, which receives both the
  messages a handler dead-letters and those RabbitMQ dead-letters itself.

Publishing uses one channel with publisher confirms, `mandatory` and
`on_return_raises`, so `publish` returns only once RabbitMQ has the message on
disk and raises when no queue took it. Each subscription has its own channel
with the topic's concurrency as prefetch, and runs every delivery's handler in
a task of its own.

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
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import aio_pika
import aiormq
import aiormq.abc
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from aio_pika.connection import make_url
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    AuthenticationError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    DeliveryError,
    ProbableAuthenticationError,
    PublishError,
)
from pamqp.common import FieldValue
from yarl import URL

from orchestrator.broker._amqp_dead_letters import dead_lettered, text
from orchestrator.broker.base import (
    DEAD_LETTER_ID_HEADER,
    DEAD_LETTERED_AT_HEADER,
    DELIVERIES_HEADER,
    REASON_HEADER,
    Broker,
    BrokerUnavailable,
    DeadLetter,
    DeadLetteredMessage,
    DeadLetterKeeper,
    Delivery,
    MessageHandler,
    QueueFull,
    UnroutableError,
)
from orchestrator.config import BrokerSettings
from orchestrator.tls import broker_ssl_context, tls_failure

__all__ = ["TOPIC_HEADER", "RabbitMQBroker"]

log = logging.getLogger("orchestrator.broker.rabbitmq")

TOPIC_HEADER = "x-orchestrator-topic"
"""Header naming the logical topic of a message a handler dead-lettered."""

_T = TypeVar("_T")
_DELIVERY_COUNT_HEADER = "x-delivery-count"
_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
# What a failed ack/nack or publish can raise once the connection or channel is gone.
_BROKER_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_EXCEPTIONS, TimeoutError)


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
        self._publish_channel: AbstractRobustChannel | None = None
        self._topology_channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._dlx: AbstractExchange | None = None
        self._declared: set[str] = set()  # cache, cleared when a new connection starts
        self._registered: set[str] = set()  # topics the topology channel restores
        self._known_topics: set[str] = set()
        self._declare_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._subscriptions: list[_Subscription] = []
        self._repairs: dict[str, asyncio.Task[None]] = {}  # topic -> its queue being restored
        self._repaired: dict[str, int] = {}  # topic -> restorations so far
        self._inflight: set[asyncio.Task[None]] = set()
        self._closing = False
        self._link_up = False  # connected, channels open
        self._blocked_reason: str | None = None  # RabbitMQ's, while it blocks the connection
        self._publish_timers: set[asyncio.Timeout] = set()

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
            connection = await self._connect()
            try:
                await self._open_channels(connection)
            except BaseException:
                await self._close_connection(connection)
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
                await self._drain_handlers()
                await self._close_connection(connection)
        finally:
            self._connection = None
            self._publish_channel = self._topology_channel = None
            self._exchange = self._dlx = None
            self._subscriptions.clear()
            self._link_up = False
            self._blocked_reason = None
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
                channel = _require(self._topology_channel)
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
        except _BROKER_ERRORS as exc:
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
        exchange, routing_key = _require(self._exchange), self._settings.queue_name(topic)
        fields: dict[str, FieldValue] = dict(headers or {})
        repaired = self._repaired.get(topic, 0)
        try:
            await self._publish(exchange, routing_key, body, message_id, fields, timeout=timeout)
        except _Nacked as exc:
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
            await self._publish(
                exchange, routing_key, body, message_id, fields, timeout=deadline - loop.time()
            )

    async def _publish(
        self,
        exchange: AbstractExchange,
        routing_key: str,
        body: bytes,
        message_id: str,
        headers: dict[str, FieldValue],
        *,
        timeout: float,  # noqa: ASYNC109 (the publish's one timer)
    ) -> None:
        if timeout <= 0:
            raise BrokerUnavailable(f"no time left to publish message {message_id}")
        if self._blocked_reason is not None:
            raise BrokerUnavailable(self._blocked_message(message_id))
        # The properties themselves, not an aio_pika.Message: building one costs more
        # than the rest of the publish (a validating __setattr__ per field).
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=_PERSISTENT,
            headers=headers,
            message_id=message_id,
        )
        try:
            # The one timer of this publish. aio-pika's own `timeout=` would not
            # do: it bounds the frames and the confirm, but not the wait for a
            # robust channel that is reconnecting (`get_underlay_channel`), which
            # is unbounded. Silence on a half-open connection ends here too, and
            # a blocked connection ends it early (`_on_flow_control`).
            async with asyncio.timeout(timeout) as timer:
                self._publish_timers.add(timer)
                try:
                    publishing = _require(self._publish_channel)
                    if publishing.is_closed:
                        raise ChannelInvalidStateError("the publishing channel is closed")
                    channel = await publishing.get_underlay_channel()
                    await channel.basic_publish(
                        body,
                        exchange=exchange.name,
                        routing_key=routing_key,
                        properties=properties,
                        mandatory=True,
                    )
                finally:
                    self._publish_timers.discard(timer)
        except PublishError as exc:
            raise UnroutableError(
                f"no queue for routing key {routing_key!r} on exchange {exchange.name!r}"
            ) from exc
        except DeliveryError as exc:
            raise _Nacked(f"broker refused message {message_id}: {exc!r}") from exc
        except TimeoutError as exc:
            if self._blocked_reason is not None:
                raise BrokerUnavailable(self._blocked_message(message_id)) from exc
            raise BrokerUnavailable(
                f"no publisher confirm for message {message_id} within {timeout}s"
            ) from exc
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"cannot publish message {message_id}: {exc!r}") from exc

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
        connection = _require(self._connection)

        async def on_message(message: AbstractIncomingMessage) -> None:
            self._dispatch(topic, handler, message)

        channel = connection.channel()
        if isinstance(channel, _ConsumerChannel):
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
        except _BROKER_ERRORS as exc:
            # A half-made robust channel would otherwise be restored forever.
            with contextlib.suppress(*_BROKER_ERRORS):
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
        with contextlib.suppress(*_BROKER_ERRORS):
            async with asyncio.timeout(2):
                await channel.close()

    def _dispatch(
        self, topic: str, handler: MessageHandler, message: AbstractIncomingMessage
    ) -> None:
        if self._closing:
            # Left unacknowledged: RabbitMQ requeues it when we disconnect.
            return
        # A task of our own, so aio-pika's consumer callback returns at once: handling
        # in its task instead cost about 15% more per message (measured), and its
        # channel would cancel the handler when the connection drops mid-way.
        task = asyncio.create_task(self._handle_safely(topic, handler, message))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _handle_safely(
        self, topic: str, handler: MessageHandler, message: AbstractIncomingMessage
    ) -> None:
        try:
            await self._handle(topic, handler, message)
        except Exception:
            # Nothing may escape a detached task; the unsettled delivery is
            # redelivered when its channel closes.
            log.exception(
                "unexpected error while handling a delivery",
                extra={"topic": topic, "message_id": message.message_id or ""},
            )

    async def _handle(
        self, topic: str, handler: MessageHandler, message: AbstractIncomingMessage
    ) -> None:
        delivery = _delivery(topic, message)
        outage_retries = 0
        while True:
            try:
                await handler(delivery)
            except DeadLetter as exc:
                await self._dead_letter(topic, message, str(exc) or "dead-lettered by handler")
                return
            except BrokerUnavailable as exc:
                if isinstance(exc, UnroutableError):
                    await self._retry_or_dead_letter(topic, message, delivery, exc)
                    return
                # The broker failed, not the message: retrying must not spend
                # the delivery limit meant for poison messages.
                outage_retries += 1
                if not await self._await_recovery(message, outage_retries):
                    return
                # Whatever the failed attempt did may have happened in part.
                delivery = dataclasses.replace(delivery, retried=True)
                continue
            except Exception as exc:
                await self._retry_or_dead_letter(topic, message, delivery, exc)
                return
            await self._ack(message, topic)
            return

    async def _await_recovery(self, message: AbstractIncomingMessage, attempt: int) -> bool:
        """Back off while the broker recovers; False when the delivery went back to its queue.

        When the delivery's own channel is gone, RabbitMQ requeues the message
        and this handling ends; after OUTAGE_RETRY_LIMIT attempts it is nacked
        back (the queue's own delivery limit still bounds a message that
        really breaks the broker).
        """
        await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
        if self._closing or _channel_gone(message):
            return False
        if attempt >= self.OUTAGE_RETRY_LIMIT:
            await self._settle(message.nack(requeue=True), "nack", "", message.message_id or "")
            return False
        return True

    async def _retry_or_dead_letter(
        self,
        topic: str,
        message: AbstractIncomingMessage,
        delivery: Delivery,
        exc: Exception,
    ) -> None:
        limit = self._settings.delivery_limit
        if delivery.delivery_count >= limit:
            # RabbitMQ's x-delivery-limit allows one delivery more than its
            # value and records only "delivery_limit"; deciding here keeps the
            # count exact and the error in the reason. The queue's own limit
            # remains the backstop for deliveries whose handler never finished.
            await self._dead_letter(topic, message, f"delivery limit {limit} reached: {exc!r}")
            return
        self._count_redelivery(topic)
        log.warning(
            "handler failed, redelivering",
            exc_info=exc,
            extra={
                "topic": topic,
                "message_id": delivery.message_id,
                "delivery_count": delivery.delivery_count,
                "reason": repr(exc),
            },
        )
        # A short backoff: a quorum queue hands a requeued message straight back.
        await asyncio.sleep(self._settings.redelivery_delay_seconds * delivery.delivery_count)
        await self._settle(message.nack(requeue=True), "nack", topic, delivery.message_id)

    async def _dead_letter(self, topic: str, message: AbstractIncomingMessage, reason: str) -> None:
        message_id = message.message_id or ""
        headers = dict(message.headers)
        earlier = headers.pop(_DELIVERY_COUNT_HEADER, None)
        headers[REASON_HEADER] = reason
        headers[TOPIC_HEADER] = topic
        headers[DEAD_LETTER_ID_HEADER] = uuid.uuid4().hex
        headers[DEAD_LETTERED_AT_HEADER] = datetime.now(UTC).isoformat()
        deliveries = (
            earlier + 1 if isinstance(earlier, int) and not isinstance(earlier, bool) else 1
        )
        headers[DELIVERIES_HEADER] = str(deliveries)
        try:
            await self._publish(
                _require(self._dlx),
                self._settings.queue_name(topic),
                message.body,
                message_id,
                headers,
                timeout=self._settings.publish_timeout_seconds,
            )
        except BrokerUnavailable as exc:
            log.error(
                "cannot dead-letter, requeueing",
                extra={
                    "topic": topic,
                    "message_id": message_id,
                    "reason": reason,
                    "error": str(exc),
                },
            )
            await self._settle(message.nack(requeue=True), "nack", topic, message_id)
            return
        self._count_dead_letter(topic)
        log.error(
            "message dead-lettered",
            extra={"topic": topic, "message_id": message_id, "reason": reason},
        )
        # Only now: the copy is confirmed, so the original may go.
        await self._ack(message, topic)

    async def _ack(self, message: AbstractIncomingMessage, topic: str) -> None:
        """Acknowledge `message`. AMQP answers no ack, so while the connection's write
        queue has room the ack is queued without waiting for the writer, and needs no
        timer; a full queue (a stalled link) takes the timed way."""
        tag = message.delivery_tag
        try:
            channel = message.channel  # raises once the channel is gone
            queue = getattr(channel, "write_queue", None)
            if channel.is_closed or tag is None or queue is None or queue.full():
                await self._settle(message.ack(), "ack", topic, message.message_id or "")
                return
            await channel.basic_ack(tag, wait=False)
        except _BROKER_ERRORS as exc:
            log.warning(
                "settling a delivery failed, the broker will redeliver it",
                extra={
                    "topic": topic,
                    "message_id": message.message_id or "",
                    "operation": "ack",
                    "error": repr(exc),
                },
            )

    async def _settle(
        self, operation: Awaitable[None], kind: str, topic: str, message_id: str
    ) -> None:
        try:
            async with asyncio.timeout(self._settings.publish_timeout_seconds):
                await operation
        except _BROKER_ERRORS as exc:
            # The delivery tag belonged to a channel that is gone (typically
            # replaced after a reconnect); RabbitMQ redelivers the message.
            log.warning(
                "settling a delivery failed, the broker will redeliver it",
                extra={
                    "topic": topic,
                    "message_id": message_id,
                    "operation": kind,
                    "error": repr(exc),
                },
            )

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
        taken = 0
        failure: Exception | None = None
        async with self._raw_channel() as channel:
            while taken < limit:
                try:
                    got = await channel.basic_get(queue_name, no_ack=False, timeout=5)
                except ChannelNotFoundEntity:
                    return taken  # never declared: nothing was dead-lettered
                if not isinstance(got.delivery, aiormq.spec.Basic.GetOk):
                    break
                tag = got.delivery.delivery_tag or 0
                letter = dead_lettered(topic, got.body, got.header.properties)
                try:
                    await keep(letter)
                except Exception as exc:
                    # The keeper's failure, not the broker's: raised as it is, below.
                    failure = exc
                    await channel.basic_nack(tag, requeue=True)
                    break
                await channel.basic_ack(tag)
                taken += 1
        if failure is not None:
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

    async def _connect(self) -> AbstractRobustConnection:
        settings = self._settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.connect_timeout_seconds
        attempt = 0
        # amqps: the broker's chain and host name are always verified, with our context.
        tls = broker_ssl_context(settings.tls) if settings.scheme == "amqps" else None
        while True:
            attempt += 1
            remaining = deadline - loop.time()
            connection = _FlowControlledConnection(
                make_url(
                    settings.url.get_secret_value(),
                    heartbeat=settings.heartbeat_seconds,
                ),
                on_flow_control=self._on_flow_control,
                reconnect_interval=settings.reconnect_interval_seconds,
                client_properties={"connection_name": "orchestrator"},
                ssl_context=tls,
            )
            try:
                async with asyncio.timeout(max(remaining, 0.1)):
                    await connection.connect(timeout=max(remaining, 0.1))
                return connection
            except (AuthenticationError, ProbableAuthenticationError) as exc:
                await self._close_connection(connection)
                # Retrying cannot fix credentials: fail now, naming only the safe URL.
                raise BrokerUnavailable(
                    f"broker {settings.safe_url} refused the login: {exc}"
                ) from None
            except _BROKER_ERRORS as exc:
                await self._close_connection(connection)
                if (failure := tls_failure(exc)) is not None:
                    # A certificate that does not verify will not verify on retry either.
                    raise BrokerUnavailable(
                        f"broker {settings.safe_url}: TLS handshake failed: "
                        f"{failure.reason or type(failure).__name__}: "
                        f"{getattr(failure, 'verify_message', '') or failure.strerror or ''}"
                    ) from None
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise BrokerUnavailable(
                        f"broker {settings.safe_url} unreachable for "
                        f"{settings.connect_timeout_seconds}s: {exc!r}"
                    ) from None
                log.warning(
                    "broker unreachable, retrying",
                    extra={"url": settings.safe_url, "attempt": attempt, "error": repr(exc)},
                )
                await asyncio.sleep(min(0.5 * attempt, 5.0, remaining))
            except asyncio.CancelledError:
                # Its reconnection task would otherwise keep trying in the background.
                await self._close_connection(connection)
                raise

    async def _open_channels(self, connection: AbstractRobustConnection) -> None:
        try:
            async with asyncio.timeout(self._settings.publish_timeout_seconds):
                publish_channel = connection.channel(publisher_confirms=True, on_return_raises=True)
                await publish_channel.initialize()
                topology_channel = connection.channel()
                await topology_channel.initialize()
                exchange = await publish_channel.declare_exchange(
                    self._exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
                )
                dlx = await publish_channel.declare_exchange(
                    self._dlx_name, aio_pika.ExchangeType.DIRECT, durable=True
                )
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"cannot open channels on {self._settings.safe_url}") from exc
        self._publish_channel, self._topology_channel = publish_channel, topology_channel
        self._exchange, self._dlx = exchange, dlx

    async def _cancel_consumers(self) -> None:
        # While disconnected a cancel would wait for the reconnect: bound them
        # all together; the deliveries go back with the connection anyway.
        cancels = [
            queue.cancel(tag)
            for subscription in self._subscriptions
            if subscription.consumer is not None
            for _channel, queue, tag in [subscription.consumer]
        ]
        with contextlib.suppress(*_BROKER_ERRORS):
            async with asyncio.timeout(2):
                await asyncio.gather(*cancels, return_exceptions=True)

    async def _drain_handlers(self) -> None:
        if not self._inflight:
            return
        _, pending = await asyncio.wait(set(self._inflight), timeout=self.CLOSE_GRACE_SECONDS)
        for task in pending:
            task.cancel()
        if pending:
            log.warning(
                "cancelled handlers still running at close; their messages will be redelivered",
                extra={"count": len(pending)},
            )
            await asyncio.gather(*pending, return_exceptions=True)

    async def _close_connection(self, connection: AbstractRobustConnection) -> None:
        with contextlib.suppress(*_BROKER_ERRORS):
            async with asyncio.timeout(5):
                await connection.close()

    @contextlib.asynccontextmanager
    async def _raw_channel(self) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        # A plain aiormq channel: a passive declare of a missing queue closes
        # its channel, which must not be one the robust connection restores.
        connection = _require(self._connection)
        transport = connection.transport
        if transport is None:
            raise BrokerUnavailable(f"not connected to {self._settings.safe_url}")
        try:
            channel = await transport.connection.channel(publisher_confirms=False, timeout=5)
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"cannot open a channel: {exc!r}") from exc
        try:
            yield channel
        except ChannelNotFoundEntity:
            raise
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"broker operation failed: {exc!r}") from exc
        finally:
            with contextlib.suppress(*_BROKER_ERRORS):
                async with asyncio.timeout(5):
                    await channel.close()

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
        if reason == self._blocked_reason:
            return
        self._blocked_reason = reason
        if reason is not None:
            log.warning(
                "broker blocked publishing",
                extra={"url": self._settings.safe_url, "reason": reason},
            )
            # The publishes in flight wait for confirms RabbitMQ will not send
            # while blocked: expire their timers now rather than at their end.
            now = asyncio.get_running_loop().time()
            for timer in self._publish_timers:
                if not timer.expired():
                    timer.reschedule(now)
        elif self._link_up:
            log.info("broker unblocked publishing", extra={"url": self._settings.safe_url})
        self._refresh_health()

    def _refresh_health(self) -> None:
        self._set_healthy(self._link_up and self._blocked_reason is None)

    def _blocked_message(self, message_id: str) -> str:
        return (
            f"cannot publish message {message_id}: broker {self._settings.safe_url} "
            f"blocked publishing ({self._blocked_reason})"
        )


class _Nacked(BrokerUnavailable):
    """RabbitMQ nacked a publish (a full queue, when it has a length limit)."""


_FlowControlListener = Callable[[str | None], None]


@dataclasses.dataclass(slots=True)
class _Subscription:
    """A topic consumed with a handler, and its consumer while it has one."""

    topic: str
    handler: MessageHandler
    consumer: tuple[AbstractRobustChannel, AbstractRobustQueue, str] | None = None


# aiormq handles RabbitMQ's Connection.Blocked and Connection.Unblocked frames
# itself, in private (name-mangled) methods, and offers no callback for them.
# Its frame reader calls them through the instance, so wrapping them on each
# connection observes the frames without changing what aiormq does with them.
_BLOCKED_HANDLER = "_Connection__handle_connection_blocked"
_UNBLOCKED_HANDLER = "_Connection__handle_connection_unblocked"
# The event aiormq clears on Blocked and sets on Unblocked; `ready()` waits for it.
_UNBLOCKED_EVENT = "_Connection__connection_unblocked"


class _ConsumerChannel(aio_pika.RobustChannel):
    """A robust channel that leaves a consumer RabbitMQ cancelled to the broker.

    RabbitMQ cancels a consumer whose queue was deleted. aio-pika's own answer
    (its reconnect task restoring the channel's consumers) waits for the
    connection to be ready, and waits forever if the connection dies meanwhile:
    the task that would reconnect it is the one waiting (aio-pika 10.2). So a
    cancelled consumer only calls `consumer_cancelled`, and the broker restores
    the topic itself (`RabbitMQBroker._restore_topic`) on channels of its own.
    Reconnects are left to aio-pika, which restores channels as before.
    """

    consumer_cancelled: Callable[[], None] | None = None

    def _on_consumer_cancel(self, frame: aiormq.spec.Basic.Cancel) -> None:
        if self.consumer_cancelled is not None:
            self.consumer_cancelled()


class _FlowControlledConnection(aio_pika.RobustConnection):
    """A robust connection that tells `on_flow_control` when RabbitMQ blocks or unblocks it.

    Every underlying aiormq connection, the first and each one after a
    reconnect, is observed from its start: `_on_connected` runs before any
    channel is opened or restored on it. A new connection starts unblocked.
    Its channels are `_ConsumerChannel`s.
    """

    CHANNEL_CLASS = _ConsumerChannel

    def __init__(self, url: URL, *, on_flow_control: _FlowControlListener, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._on_flow_control = on_flow_control

    async def _on_connected(self) -> None:
        transport = self.transport
        if transport is not None:
            self._on_flow_control(None)
            _observe_flow_control(transport.connection, self._on_flow_control)
        await super()._on_connected()


def _observe_flow_control(
    connection: aiormq.abc.AbstractConnection, listener: _FlowControlListener
) -> None:
    unblocked_event = getattr(connection, _UNBLOCKED_EVENT, None)
    if isinstance(unblocked_event, asyncio.Event):
        # aiormq leaves `ready()` waiting forever on a connection that closed
        # while blocked, and aio-pika's channel restore, started as the old
        # connection closes, waits there holding the channel's restore lock:
        # the reconnect would never finish. A closed connection blocks nothing.
        connection.closing.add_done_callback(lambda _closed: unblocked_event.set())
    blocked = getattr(connection, _BLOCKED_HANDLER, None)
    unblocked = getattr(connection, _UNBLOCKED_HANDLER, None)
    if blocked is None or unblocked is None:
        # A later aiormq renamed them: publishes on a blocked connection then
        # fail only at their timeout, and health does not show the block.
        log.warning("cannot observe the broker's flow control with this aiormq version")
        return

    async def on_blocked(frame: aiormq.spec.Connection.Blocked) -> None:
        await blocked(frame)
        listener(frame.reason or "no reason given")

    async def on_unblocked(frame: aiormq.spec.Connection.Unblocked) -> None:
        await unblocked(frame)
        listener(None)

    setattr(connection, _BLOCKED_HANDLER, on_blocked)
    setattr(connection, _UNBLOCKED_HANDLER, on_unblocked)


def _require(value: _T | None) -> _T:
    if value is None:
        raise BrokerUnavailable("the broker is not started")
    return value


def _channel_gone(message: AbstractIncomingMessage) -> bool:
    try:
        return message.channel.is_closed
    except ChannelInvalidStateError:  # raised by the property itself once closed
        return True


def _delivery(topic: str, message: AbstractIncomingMessage) -> Delivery:
    raw_count = message.headers.get(_DELIVERY_COUNT_HEADER)
    # Quorum queues count earlier deliveries in x-delivery-count; the
    # redelivered flag is the only hint a classic queue gives.
    count = raw_count + 1 if isinstance(raw_count, int) and not isinstance(raw_count, bool) else 1
    if message.redelivered:
        count = max(count, 2)
    headers = {
        key: text(value) for key, value in message.headers.items() if key != _DELIVERY_COUNT_HEADER
    }
    return Delivery(
        topic=topic,
        body=message.body,
        message_id=message.message_id or "",
        headers=headers,
        delivery_count=count,
    )
