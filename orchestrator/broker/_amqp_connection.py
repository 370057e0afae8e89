"""The AMQP connection under `RabbitMQBroker`: connecting, flow control, raw channels.

aio-pika's robust connection reconnects and restores channels by itself; this
module adds what the broker needs on top of it: a connect that retries for a
bounded time and fails at once on what retrying cannot fix (credentials, a
certificate), RabbitMQ's `connection.blocked` frames reported to a listener,
consumer cancellations left to the broker, and plain aiormq channels for
operations that may close their channel (a passive declare of a missing queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import aio_pika
import aiormq
import aiormq.abc
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    AuthenticationError,
    ChannelNotFoundEntity,
    ProbableAuthenticationError,
)
from yarl import URL

from orchestrator.broker.base import BrokerUnavailable
from orchestrator.config import BrokerSettings
from orchestrator.tls import broker_ssl_context, tls_failure

__all__ = [
    "BROKER_ERRORS",
    "ConsumerChannel",
    "FlowControlListener",
    "close_connection",
    "connect",
    "raw_channel",
    "require",
]

log = logging.getLogger("orchestrator.broker.rabbitmq")

_T = TypeVar("_T")

BROKER_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_EXCEPTIONS, TimeoutError)
"""What a failed ack/nack or publish can raise once the connection or channel is gone."""

FlowControlListener = Callable[[str | None], None]
"""Told RabbitMQ's reason when it blocks the connection, None when it unblocks it."""


def require(value: _T | None) -> _T:
    """`value`, which exists once the broker started; BrokerUnavailable before that."""
    if value is None:
        raise BrokerUnavailable("the broker is not started")
    return value


async def connect(
    settings: BrokerSettings, on_flow_control: FlowControlListener
) -> AbstractRobustConnection:
    """A robust connection to `settings.url`, retried for `connect_timeout_seconds`.

    Raises BrokerUnavailable, naming only the safe URL, when RabbitMQ stays
    unreachable, refuses the login or fails the TLS handshake (the last two
    at once: retrying cannot fix them).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.connect_timeout_seconds
    attempt = 0
    # amqps: the broker's chain and host name are always verified, with our context.
    tls = broker_ssl_context(settings.tls) if settings.scheme == "amqps" else None
    while True:
        attempt += 1
        remaining = deadline - loop.time()
        connection = _FlowControlledConnection(
            make_url(settings.url.get_secret_value(), heartbeat=settings.heartbeat_seconds),
            on_flow_control=on_flow_control,
            reconnect_interval=settings.reconnect_interval_seconds,
            client_properties={"connection_name": "orchestrator"},
            ssl_context=tls,
        )
        try:
            async with asyncio.timeout(max(remaining, 0.1)):
                await connection.connect(timeout=max(remaining, 0.1))
            return connection
        except (AuthenticationError, ProbableAuthenticationError) as exc:
            await close_connection(connection)
            # Retrying cannot fix credentials: fail now, naming only the safe URL.
            raise BrokerUnavailable(
                f"broker {settings.safe_url} refused the login: {exc}"
            ) from None
        except BROKER_ERRORS as exc:
            await close_connection(connection)
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
            await close_connection(connection)
            raise


async def close_connection(connection: AbstractRobustConnection) -> None:
    """Close `connection` within 5 s, whatever state it is in."""
    with contextlib.suppress(*BROKER_ERRORS):
        async with asyncio.timeout(5):
            await connection.close()


@contextlib.asynccontextmanager
async def raw_channel(
    connection: AbstractRobustConnection, safe_url: str
) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A plain aiormq channel on `connection`, closed at the end.

    A passive declare of a missing queue closes its channel, which must not be
    one the robust connection restores. Broker errors inside become
    BrokerUnavailable; ChannelNotFoundEntity passes as it is.
    """
    transport = connection.transport
    if transport is None:
        raise BrokerUnavailable(f"not connected to {safe_url}")
    try:
        channel = await transport.connection.channel(publisher_confirms=False, timeout=5)
    except BROKER_ERRORS as exc:
        raise BrokerUnavailable(f"cannot open a channel: {exc!r}") from exc
    try:
        yield channel
    except ChannelNotFoundEntity:
        raise
    except BROKER_ERRORS as exc:
        raise BrokerUnavailable(f"broker operation failed: {exc!r}") from exc
    finally:
        with contextlib.suppress(*BROKER_ERRORS):
            async with asyncio.timeout(5):
                await channel.close()


# aiormq handles RabbitMQ's Connection.Blocked and Connection.Unblocked frames
# itself, in private (name-mangled) methods, and offers no callback for them.
# Its frame reader calls them through the instance, so wrapping them on each
# connection observes the frames without changing what aiormq does with them.
_BLOCKED_HANDLER = "_Connection__handle_connection_blocked"
_UNBLOCKED_HANDLER = "_Connection__handle_connection_unblocked"
# The event aiormq clears on Blocked and sets on Unblocked; `ready()` waits for it.
_UNBLOCKED_EVENT = "_Connection__connection_unblocked"


class ConsumerChannel(aio_pika.RobustChannel):
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
    Its channels are `ConsumerChannel`s.
    """

    CHANNEL_CLASS = ConsumerChannel

    def __init__(self, url: URL, *, on_flow_control: FlowControlListener, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._on_flow_control = on_flow_control

    async def _on_connected(self) -> None:
        transport = self.transport
        if transport is not None:
            self._on_flow_control(None)
            _observe_flow_control(transport.connection, self._on_flow_control)
        await super()._on_connected()


def _observe_flow_control(
    connection: aiormq.abc.AbstractConnection, listener: FlowControlListener
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
