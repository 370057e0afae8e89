"""Publishing to RabbitMQ: persistent, confirmed, mandatory, each publish under one timer.

A publish returns once RabbitMQ confirmed the message, and raises
UnroutableError when no queue took it (`mandatory` and `on_return_raises`),
Nacked (a BrokerUnavailable) on a nack, BrokerUnavailable on a lost or silent
connection or no confirm in time. While RabbitMQ blocks the connection
(`connection.blocked`, sent while a memory or disk alarm is in effect)
publishes fail at once with its reason, those in flight included.
"""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel
from aio_pika.exceptions import ChannelInvalidStateError, DeliveryError, PublishError
from pamqp.common import FieldValue

from orchestrator.broker._amqp_connection import BROKER_ERRORS, require
from orchestrator.broker.base import BrokerUnavailable, UnroutableError

__all__ = ["Nacked", "Publisher"]

_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


class Nacked(BrokerUnavailable):
    """RabbitMQ nacked a publish (a queue with a length limit that is full)."""


class Publisher:
    """Publishes on one confirming channel (`channel`, set once the broker opened it)."""

    def __init__(self, safe_url: str) -> None:
        self._safe_url = safe_url
        self.channel: AbstractRobustChannel | None = None
        """The publishing channel, with publisher confirms and `on_return_raises`."""
        self._blocked_reason: str | None = None  # RabbitMQ's, while it blocks the connection
        self._timers: set[asyncio.Timeout] = set()

    @property
    def blocked(self) -> bool:
        """True while RabbitMQ blocks the connection."""
        return self._blocked_reason is not None

    def block(self, reason: str | None) -> bool:
        """RabbitMQ blocked the connection for `reason`, or (None) unblocked it; whether
        that changed anything. Blocking ends the publishes in flight at once."""
        if reason == self._blocked_reason:
            return False
        self._blocked_reason = reason
        if reason is not None:
            # The publishes in flight wait for confirms RabbitMQ will not send
            # while blocked: expire their timers now rather than at their end.
            now = asyncio.get_running_loop().time()
            for timer in self._timers:
                if not timer.expired():
                    timer.reschedule(now)
        return True

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_id: str,
        headers: dict[str, FieldValue],
        *,
        timeout: float,  # noqa: ASYNC109 (the publish's one timer)
    ) -> None:
        """Publish persistently to `exchange` and wait for the confirm, `timeout` at most."""
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
            # a blocked connection ends it early (`block`).
            async with asyncio.timeout(timeout) as timer:
                self._timers.add(timer)
                try:
                    publishing = require(self.channel)
                    if publishing.is_closed:
                        raise ChannelInvalidStateError("the publishing channel is closed")
                    channel = await publishing.get_underlay_channel()
                    await channel.basic_publish(
                        body,
                        exchange=exchange,
                        routing_key=routing_key,
                        properties=properties,
                        mandatory=True,
                    )
                finally:
                    self._timers.discard(timer)
        except PublishError as exc:
            raise UnroutableError(
                f"no queue for routing key {routing_key!r} on exchange {exchange!r}"
            ) from exc
        except DeliveryError as exc:
            raise Nacked(f"broker refused message {message_id}: {exc!r}") from exc
        except TimeoutError as exc:
            if self._blocked_reason is not None:
                raise BrokerUnavailable(self._blocked_message(message_id)) from exc
            raise BrokerUnavailable(
                f"no publisher confirm for message {message_id} within {timeout}s"
            ) from exc
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"cannot publish message {message_id}: {exc!r}") from exc

    def _blocked_message(self, message_id: str) -> str:
        return (
            f"cannot publish message {message_id}: broker {self._safe_url} "
            f"blocked publishing ({self._blocked_reason})"
        )
