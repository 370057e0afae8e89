"""Declaring a prefix's stream and its topics' durable consumers on NATS JetStream.

The stream keeps messages until a consumer acknowledges them (work-queue
retention) on disk, and drops a second message with an id it has seen within
its duplicate window (`Nats-Msg-Id`). A topic's consumer delivers each
message at most `delivery_limit + 1` times (`max_deliver`: the last delivery
only dead-letters it), each for `ack_wait_seconds` unless its handler reports
progress. Declaring again is idempotent and updates what JetStream lets a
consumer change (its delivery limit, ack wait and pending limit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from orchestrator.broker._nats_link import NatsLink
from orchestrator.broker._nats_names import NatsNames, check_topic
from orchestrator.config import BrokerSettings
from orchestrator.errors import BrokerUnavailable

__all__ = ["DUPLICATE_WINDOW_SECONDS", "NatsTopology", "timed"]

DUPLICATE_WINDOW_SECONDS = 120.0
"""How long the stream remembers a message id to drop a second publish of it."""
_DEAD_LETTER_ACK_WAIT_SECONDS = 30.0
_STREAM_IN_USE = 10058  # JetStream: stream name already in use with a different configuration

_T = TypeVar("_T")


class NatsTopology:
    """The stream and consumers of `settings`' topics, declared through `link`."""

    def __init__(self, link: NatsLink, settings: BrokerSettings, names: NatsNames) -> None:
        self._link = link
        self._settings = settings
        self._names = names
        self._lock = asyncio.Lock()

    async def declare_stream(self) -> None:
        """Create the prefix's stream, or bring an existing one to this configuration."""
        js = self._link.js
        config = StreamConfig(
            name=self._names.stream,
            subjects=[self._names.subjects],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
            max_msg_size=self._settings.max_message_bytes,
        )
        try:
            await self._timed(js.add_stream(config), "declare the stream")
        except BrokerUnavailable as exc:
            cause = exc.__cause__
            if not (
                isinstance(cause, nats.js.errors.APIError) and cause.err_code == _STREAM_IN_USE
            ):
                raise
            await self._timed(js.update_stream(config), "update the stream")

    async def declare(self, topic: str) -> None:
        """Declare `topic`: the stream, the topic's consumer and its dead letters' consumer."""
        check_topic(topic)
        async with self._lock:
            await self.declare_stream()
            await self._add_consumer(self._topic_consumer(topic))
            await self._add_consumer(self._dead_letter_consumer(topic))

    async def consumer_exists(self, topic: str) -> bool:
        """True when `topic`'s consumer exists (someone declared the topic)."""
        try:
            await self._timed(
                self._link.js.consumer_info(self._names.stream, self._names.consumer(topic)),
                "look up the topic",
            )
        except BrokerUnavailable as exc:
            if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                return False
            raise
        return True

    async def _add_consumer(self, config: ConsumerConfig) -> None:
        await self._timed(
            self._link.js.add_consumer(self._names.stream, config), "declare a consumer"
        )

    def _topic_consumer(self, topic: str) -> ConsumerConfig:
        settings = self._settings
        name = self._names.consumer(topic)
        return ConsumerConfig(
            name=name,
            durable_name=name,
            filter_subject=self._names.subject(topic),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=settings.ack_wait_seconds,
            max_deliver=settings.delivery_limit + 1,
            # Every replica pulls through this consumer: room for several at full concurrency.
            max_ack_pending=max(1000, 4 * settings.concurrency_of(topic)),
        )

    def _dead_letter_consumer(self, topic: str) -> ConsumerConfig:
        name = self._names.dead_letter_consumer(topic)
        return ConsumerConfig(
            name=name,
            durable_name=name,
            filter_subject=self._names.dead_letter_subject(topic),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=_DEAD_LETTER_ACK_WAIT_SECONDS,
        )

    async def _timed(self, operation: Awaitable[_T], what: str) -> _T:
        """`operation` within `publish_timeout_seconds`, its failures as BrokerUnavailable."""
        return await timed(self._link, self._settings, operation, what)


async def timed(
    link: NatsLink, settings: BrokerSettings, operation: Awaitable[_T], what: str
) -> _T:
    """Await a JetStream `operation` within `publish_timeout_seconds`; a failure of the
    server or the link raises BrokerUnavailable (the cause kept) saying what could not be
    done."""
    try:
        async with asyncio.timeout(settings.publish_timeout_seconds):
            return await operation
    except (nats.errors.Error, TimeoutError, OSError) as exc:
        raise BrokerUnavailable(f"cannot {what}: {link.describe(exc)}") from exc
