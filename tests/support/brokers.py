"""Each real broker as the behaviour tests reach it: settings, a started broker, clean-up.

A behaviour of the broker contract is specified once and run against every
real broker (`broker_kind`: `rabbitmq`, `nats`). `BrokerKit` hides what
differs: the URL, the broker class, how a test's topology is deleted, and the
private server a test may stop or kill (`PrivateNode`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Literal, Protocol

import nats
import nats.js.errors

from orchestrator.broker import broker_from_settings
from orchestrator.broker.base import Broker, DeadLetteredMessage
from orchestrator.broker.nats import NatsBroker
from orchestrator.broker.rabbitmq import RabbitMQBroker
from orchestrator.config import BrokerSettings

__all__ = [
    "BROKER_KINDS",
    "BrokerKind",
    "BrokerKit",
    "PrivateNode",
    "delete_nats_stream",
    "drained_soon",
    "messages_left",
    "messages_waiting",
]

BrokerKind = Literal["rabbitmq", "nats"]
BROKER_KINDS: tuple[BrokerKind, ...] = ("rabbitmq", "nats")


class PrivateNode(Protocol):
    """A broker server of a test's own (RabbitMQNode, NatsServer)."""

    @property
    def url(self) -> str:
        """Its URL, credentials included."""

    @property
    def running(self) -> bool:
        """True between a start and a stop or kill."""

    def add_user(self, user: str, password: str) -> str:
        """Let `user` log in; its URL."""

    async def astart(self) -> None:
        """Start it."""

    async def astop(self) -> None:
        """Stop it cleanly."""

    async def akill(self) -> None:
        """SIGKILL it."""

    async def arestart(self) -> None:
        """Stop and start it."""


@dataclass(frozen=True)
class BrokerKit:
    """One kind of real broker, at `url`."""

    kind: BrokerKind
    url: str

    def settings(self, url: str | None = None, **overrides: object) -> BrokerSettings:
        """Settings for one test on `url` (default: the kit's): a unique topic prefix,
        quick reconnects and retries."""
        from tests.support.broker_fixtures import make_settings

        return make_settings(url or self.url, **overrides)

    def broker(self, settings: BrokerSettings, **class_attributes: object) -> Broker:
        """An unstarted broker of this kind; `class_attributes` override its class's."""
        cls: type[Broker] = RabbitMQBroker if self.kind == "rabbitmq" else NatsBroker
        if class_attributes:
            cls = type(f"Tuned{cls.__name__}", (cls,), class_attributes)
        return cls(settings)  # type: ignore[call-arg]

    @asynccontextmanager
    async def running(self, settings: BrokerSettings) -> AsyncIterator[Broker]:
        """A started broker on `settings`, closed on exit."""
        broker = self.broker(settings)
        await broker.start()
        try:
            yield broker
        finally:
            await broker.close()

    async def delete(self, settings: BrokerSettings, topics: frozenset[str]) -> None:
        """Delete what `settings`' prefix declared for `topics` (queues and exchanges, or
        the prefix's stream)."""
        if self.kind == "rabbitmq":
            from tests.support.broker_fixtures import delete_topology

            await delete_topology(settings, topics)
        else:
            await delete_nats_stream(settings)


async def delete_nats_stream(settings: BrokerSettings) -> None:
    """Delete the JetStream stream of `settings`' prefix (and its consumers), if any."""
    client = await nats.connect(settings.url.get_secret_value(), connect_timeout=5)
    try:
        with_stream = NatsBroker(settings)
        with suppress(nats.js.errors.NotFoundError):
            await client.jetstream().delete_stream(with_stream.stream)
    finally:
        await client.close()


async def messages_left(settings: BrokerSettings, topics: tuple[str, ...]) -> dict[str, int]:
    """Messages left in each topic (not delivered, or on NATS not acknowledged either) and
    its dead letters, which are taken; an empty dict when every topic was drained."""
    inspector = broker_from_settings(settings)
    await inspector.start()
    try:
        left: dict[str, int] = {}
        for topic in topics:
            if isinstance(inspector, NatsBroker):
                waiting = await inspector.stored(topic)
            else:
                assert isinstance(inspector, RabbitMQBroker)
                waiting = await inspector.depth(topic)
            if waiting:
                left[topic] = waiting
            dead: list[DeadLetteredMessage] = await inspector.dead_letters(topic)  # type: ignore[attr-defined]
            if dead:
                left[f"{topic}.dlq"] = len(dead)
        return left
    finally:
        await inspector.close()


async def messages_waiting(settings: BrokerSettings, topics: tuple[str, ...]) -> dict[str, int]:
    """Messages still in each topic (RabbitMQ: ready; NATS: not acknowledged), taking none."""
    inspector = broker_from_settings(settings)
    await inspector.start()
    try:
        waiting: dict[str, int] = {}
        for topic in topics:
            if isinstance(inspector, NatsBroker):
                count = await inspector.stored(topic)
            else:
                assert isinstance(inspector, RabbitMQBroker)
                count = await inspector.depth(topic)
            if count:
                waiting[topic] = count
        return waiting
    finally:
        await inspector.close()


async def drained_soon(
    settings: BrokerSettings, topics: tuple[str, ...], *, within: float = 30.0
) -> None:
    """Wait until no topic holds a message, while the service runs: on NATS, deliveries
    whose acknowledgement a broker restart or a killed consumer lost come back after the
    ack wait, and are dropped as duplicates then."""
    waiting: dict[str, int] = {}
    try:
        async with asyncio.timeout(within):
            while waiting := await messages_waiting(settings, topics):  # noqa: ASYNC110
                await asyncio.sleep(0.5)
    except TimeoutError:
        raise AssertionError(f"topics not drained within {within}s: {waiting}") from None
