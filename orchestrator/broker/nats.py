"""NATS JetStream through nats-py, with the semantics of `orchestrator.broker.base`.

Chosen by a `nats://` broker URL (`nats://user:password@host:4222` or
`nats://token@host:4222`); needs the `nats` extra (`pip install
'saga-orchestrator[nats]'`).

Topology, all on disk, so that it and the messages survive a restart of the
server (see `_nats_names` for the names):

- one stream per topic prefix, with work-queue retention (a message stays
  until a consumer acknowledges it) and a duplicate window for `Nats-Msg-Id`;
- per topic a durable pull consumer shared by every replica, with explicit
  acks, `max_deliver` of `delivery_limit + 1` and an ack wait of
  `ack_wait_seconds`; and a durable consumer of the topic's dead letters.

`publish` returns once the stream acknowledged the message (`PubAck`), and
raises UnroutableError for a topic nobody declared. Consumers pull as many
messages as the topic's concurrency leaves room for, and settle each after
its handler returned (`_nats_consumer`). JetStream has no dead-letter queue:
messages given up are copied to a dead-letter subject with their reason, then
terminated (`_nats_dead_letters`).

A topic's consumer or the stream deleted while the broker runs comes back:
a publish to a topic this broker declared that finds no stream declares its
topics again and publishes once more, within its timeout, and a pull loop
that finds its consumer gone does the same.

Health follows the connection: lost, the broker is unhealthy until nats-py
reconnects it. JetStream refusing publishes for lack of room makes it
unhealthy too, for `reconnect_interval_seconds` at a time (`_nats_publisher`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import ClassVar

try:
    import nats.js
except ImportError as exc:  # pragma: no cover (the dev extras install it)
    raise ImportError(
        "broker.url is a nats:// URL, which needs the NATS client: "
        "pip install 'saga-orchestrator[nats]'"
    ) from exc
from nats.aio.msg import Msg

from orchestrator.broker._nats_consumer import NatsSubscription
from orchestrator.broker._nats_dead_letters import NatsDeadLetters
from orchestrator.broker._nats_link import NatsLink
from orchestrator.broker._nats_names import NatsNames
from orchestrator.broker._nats_publisher import NatsPublisher
from orchestrator.broker._nats_topology import NatsTopology, timed
from orchestrator.broker.base import (
    Broker,
    BrokerUnavailable,
    DeadLetteredMessage,
    DeadLetterKeeper,
    MessageHandler,
    UnroutableError,
)
from orchestrator.config import BrokerSettings

__all__ = ["NatsBroker"]

log = logging.getLogger("orchestrator.broker.nats")


class NatsBroker(Broker):
    """A `Broker` on NATS JetStream; see the module docstring for the topology."""

    CLOSE_GRACE_SECONDS: ClassVar[float] = 5.0
    """How long `close()` lets in-flight handlers finish before cancelling them."""

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__()
        self.settings = settings
        """The settings this broker runs on."""
        self._names = NatsNames.of(settings)
        self._link = NatsLink(settings, self._on_link)
        self._publisher = NatsPublisher(self._link, settings, self._names, self._on_blocked)
        self._topology = NatsTopology(self._link, settings, self._names)
        self._dead_letters = NatsDeadLetters(
            self._link, settings, self._names, self._publisher, self._count_dead_letter
        )
        self._subscriptions: list[NatsSubscription] = []
        self._declared: set[str] = set()  # by this broker: restored when deleted
        self._routable: set[str] = set()  # declared here, or seen declared by someone
        self._repair: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closing = False
        self._link_up = False

    @property
    def stream(self) -> str:
        """The JetStream stream holding this broker's topics and dead letters."""
        return self._names.stream

    @property
    def declared_topics(self) -> frozenset[str]:
        """Every topic this broker has declared."""
        return frozenset(self._declared)

    @property
    def closing(self) -> bool:
        """True from `close()` on, until the next `start()`."""
        return self._closing

    @property
    def connected(self) -> bool:
        """True while the connection to the server is up."""
        return self._link.connected

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Connect (retrying for `connect_timeout_seconds`) and declare the stream.

        Raises BrokerUnavailable when the server cannot be reached in time,
        refuses the credentials or offers no JetStream.
        """
        async with self._start_lock:
            if self._started:
                return
            self._closing = False
            await self._link.connect()
            try:
                await self._topology.declare_stream()
                await self._dead_letters.watch()
            except BaseException:
                await self._link.close()
                raise
            self._started = True
            self._refresh_health()

    async def close(self) -> None:
        """Stop pulling, let in-flight handlers finish briefly, then disconnect.

        Handlers still running after `CLOSE_GRACE_SECONDS` are cancelled and
        their messages given back at once (`nak`); a message pulled but not yet
        handled comes back after `ack_wait_seconds`.
        """
        self._closing = True
        try:
            if self._repair is not None:
                self._repair.cancel()
                await asyncio.gather(self._repair, return_exceptions=True)
            await asyncio.gather(
                *(sub.stop(self.CLOSE_GRACE_SECONDS) for sub in self._subscriptions)
            )
            await self._dead_letters.close()
            await self._link.flush()
            await self._link.close()
        finally:
            self._subscriptions.clear()
            self._declared.clear()
            self._routable.clear()
            self._publisher.reset()
            self._repair = None
            self._started = False
            self._link_up = False
            self._refresh_health()

    # -- topology ----------------------------------------------------------

    async def declare(self, topic: str) -> None:
        """Declare the topic's consumer and dead-letter consumer; cached, so cheap to repeat.

        Raises ValueError for a topic that cannot be a NATS subject.
        """
        if topic in self._declared:
            return
        await self._topology.declare(topic)
        self._declared.add(topic)
        self._routable.add(topic)

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
        """Publish and wait for the stream's `PubAck`, for `timeout` at most.

        Raises ValueError for a body over `max_message_bytes`, UnroutableError
        when nobody declared the topic, BrokerUnavailable when the server
        refused the message, or no `PubAck` came within `timeout` (None:
        `publish_timeout_seconds`; otherwise the smaller of the two).
        """
        settings = self.settings
        if len(body) > settings.max_message_bytes:
            raise ValueError(
                f"message of {len(body)} bytes exceeds max_message_bytes "
                f"({settings.max_message_bytes})"
            )
        limit = settings.publish_timeout_seconds
        timeout = limit if timeout is None else min(timeout, limit)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if timeout <= 0:
            raise BrokerUnavailable(f"no time left to publish message {message_id}")
        if topic not in self._routable:
            if not await self._topology.consumer_exists(topic):
                raise UnroutableError(f"no consumer for topic {topic!r} on {self.stream}")
            self._routable.add(topic)
        subject = self._names.subject(topic)
        try:
            await self._publisher.publish(
                subject, body, message_id=message_id, headers=headers, deadline=deadline
            )
        except UnroutableError:
            if topic not in self._declared:
                raise
            # Declared, yet no stream: it was deleted behind our back. Declare the
            # topics again and publish once more, within the same deadline.
            await self._await_restored(deadline)
            await self._publisher.publish(
                subject, body, message_id=message_id, headers=headers, deadline=deadline
            )

    # -- consuming ---------------------------------------------------------

    async def subscribe(self, topic: str, handler: MessageHandler) -> None:
        """Pull `topic` through its durable consumer, `concurrency_of(topic)` at once."""
        await self.declare(topic)
        subscription = NatsSubscription(self, topic, handler)
        subscription.start()
        self._subscriptions.append(subscription)
        log.info(
            "consuming", extra={"topic": topic, "concurrency": self.settings.concurrency_of(topic)}
        )

    async def take_dead_letters(self, topic: str, keep: DeadLetterKeeper, *, limit: int) -> int:
        """Take the topic's dead letters one by one through its dead-letter consumer, each
        acknowledged once `keep` returned; a `keep` that raises gives its letter back."""
        return await self._dead_letters.take(topic, keep, limit=limit)

    # -- ops helpers -------------------------------------------------------

    async def dead_letters(self, topic: str) -> list[DeadLetteredMessage]:
        """Drain the topic's dead letters, returning them with their reasons."""
        drained: list[DeadLetteredMessage] = []

        async def keep(letter: DeadLetteredMessage) -> None:
            drained.append(letter)

        while await self.take_dead_letters(topic, keep, limit=1000):
            pass
        return drained

    async def depth(self, topic: str) -> int:
        """Messages of the topic not delivered yet (0 when nobody declared it); deliveries
        not acknowledged yet are not counted."""
        js = self._link.js
        try:
            info = await timed(
                self._link,
                self.settings,
                js.consumer_info(self.stream, self._names.consumer(topic)),
                "count messages",
            )
        except BrokerUnavailable as exc:
            if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                return 0
            raise
        return info.num_pending or 0

    async def stored(self, topic: str) -> int:
        """Messages of the topic still in the stream: waiting, in flight, or given up by
        JetStream and not yet dead-lettered."""
        js = self._link.js
        subject = self._names.subject(topic)
        try:
            info = await timed(
                self._link, self.settings, js.stream_info(self.stream, subject), "count messages"
            )
        except BrokerUnavailable as exc:
            if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                return 0
            raise
        return (info.state.subjects or {}).get(subject, 0)

    # -- what subscriptions need (`_nats_consumer.Host`) ----------------------

    async def bind(self, topic: str) -> nats.js.JetStreamContext.PullSubscription:
        """A pull subscription on `topic`'s durable consumer."""
        js = self._link.js
        return await timed(
            self._link,
            self.settings,
            js.pull_subscribe_bind(self._names.consumer(topic), self.stream),
            "subscribe",
        )

    async def consumer_exists(self, topic: str) -> bool:
        """True when `topic`'s consumer exists."""
        return await self._topology.consumer_exists(topic)

    async def restore(self, topic: str) -> None:
        """Declare every topic of this broker again (`topic`'s consumer was found gone)."""
        loop = asyncio.get_running_loop()
        await self._await_restored(loop.time() + self.settings.publish_timeout_seconds)

    async def dead_letter(self, topic: str, msg: Msg, reason: str) -> bool:
        """Copy `msg` to `topic`'s dead letters with `reason`, then terminate it."""
        return await self._dead_letters.send(topic, msg, reason)

    def count_redelivery(self, topic: str) -> None:
        """Count a redelivery of `topic`."""
        self._count_redelivery(topic)

    # -- internals ---------------------------------------------------------

    async def _await_restored(self, deadline: float) -> None:
        """Wait, until `deadline`, for this broker's topics to be declared again; start
        that if no one has."""
        if self._repair is None or self._repair.done():
            log.warning("topics are gone, declaring them again", extra={"stream": self.stream})
            self._repair = asyncio.create_task(self._restore_topics())
        try:
            async with asyncio.timeout_at(deadline):
                # Shielded: a publish giving up must not cut a restoration short.
                await asyncio.shield(self._repair)
        except TimeoutError as exc:
            raise BrokerUnavailable("topics not declared again in time") from exc

    async def _restore_topics(self) -> None:
        attempt = 0
        while True:
            # Until it succeeds (or `close()` cancels it): nothing else would.
            try:
                for topic in sorted(self._declared):
                    await self._topology.declare(topic)
                await self._dead_letters.watch()
                return
            except BrokerUnavailable as exc:
                attempt += 1
                log.warning(
                    "declaring topics again failed, retrying",
                    extra={"attempt": attempt, "error": str(exc)},
                )
                await asyncio.sleep(min(0.5 * attempt, 5.0))

    def _on_link(self, up: bool) -> None:
        self._link_up = up
        self._refresh_health()

    def _on_blocked(self, reason: str | None) -> None:
        if reason is not None:
            log.warning(
                "broker refuses publishes", extra={"url": self.settings.safe_url, "reason": reason}
            )
        else:
            log.info("broker takes publishes again", extra={"url": self.settings.safe_url})
        self._refresh_health()

    def _refresh_health(self) -> None:
        self._set_healthy(self._started and self._link_up and self._publisher.blocked is None)
