"""Reading a message got from a RabbitMQ dead-letter queue: its reason, time, count and id.

A message the broker's handler dead-lettered carries the orchestrator's own
headers (`REASON_HEADER`, `DEAD_LETTER_ID_HEADER`, ...); one RabbitMQ
dead-lettered itself (its delivery limit) carries only RabbitMQ's `x-death`
entries, from which the same facts are derived.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime

import aiormq
import aiormq.abc
from aio_pika.exceptions import ChannelNotFoundEntity

from orchestrator.broker.base import (
    DEAD_LETTER_ID_HEADER,
    DEAD_LETTERED_AT_HEADER,
    DELIVERIES_HEADER,
    REASON_HEADER,
    DeadLetteredMessage,
    DeadLetterKeeper,
)

__all__ = ["dead_letter_reason", "dead_lettered", "take", "text"]

_BROKER_HEADERS = frozenset({"x-death", "x-delivery-count"})
"""Headers RabbitMQ keeps for itself: its dead-letter history and a quorum queue's count."""


def text(value: object) -> str:
    """A header value as text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)


def dead_lettered(
    topic: str, body: bytes, properties: aiormq.spec.Basic.Properties
) -> DeadLetteredMessage:
    """A message got from a dead-letter queue, as the broker contract hands it over."""
    raw = properties.headers or {}
    headers = {key: text(value) for key, value in raw.items() if key not in _BROKER_HEADERS}
    message_id = properties.message_id or ""
    at = _dead_lettered_at(raw)
    letter_id = headers.get(DEAD_LETTER_ID_HEADER)
    if letter_id is None:
        # Dead-lettered by RabbitMQ itself (its delivery limit): its x-death entry, which
        # a later dead-lettering of the same message changes, says which time this is.
        seed = f"{topic}\n{message_id}\n{at.isoformat() if at else ''}\n{_death_count(raw)}"
        letter_id = hashlib.sha256(seed.encode() + body).hexdigest()[:32]
    deliveries = headers.get(DELIVERIES_HEADER, "")
    return DeadLetteredMessage(
        topic=topic,
        body=body,
        message_id=message_id,
        reason=dead_letter_reason(raw),
        headers=headers,
        delivery_count=int(deliveries) if deliveries.isdigit() else _death_count(raw),
        dead_lettered_at=at,
        id=letter_id,
    )


async def take(
    channel: aiormq.abc.AbstractChannel,
    queue_name: str,
    topic: str,
    keep: DeadLetterKeeper,
    *,
    limit: int,
) -> tuple[int, Exception | None]:
    """Get up to `limit` messages of the dead-letter queue `queue_name` one by one
    (`basic.get`), acknowledging each once `keep` returned: how many were taken, and
    the exception of a `keep` that raised (its message went back, the round ended).

    The keeper's failure is returned, not raised, so that the caller raises it as it
    is once the channel is closed, not as a broker error. A queue never declared
    holds nothing.
    """
    taken = 0
    while taken < limit:
        try:
            got = await channel.basic_get(queue_name, no_ack=False, timeout=5)
        except ChannelNotFoundEntity:
            break  # never declared: nothing was dead-lettered
        if not isinstance(got.delivery, aiormq.spec.Basic.GetOk):
            break
        tag = got.delivery.delivery_tag or 0
        letter = dead_lettered(topic, got.body, got.header.properties)
        try:
            await keep(letter)
        except Exception as exc:
            await channel.basic_nack(tag, requeue=True)
            return taken, exc
        await channel.basic_ack(tag)
        taken += 1
    return taken, None


def _dead_lettered_at(headers: Mapping[str, object]) -> datetime | None:
    stamp = headers.get(DEAD_LETTERED_AT_HEADER)
    if stamp is not None:
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(text(stamp))
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        when = deaths[0].get("time")
        if isinstance(when, datetime):
            return when if when.tzinfo else when.replace(tzinfo=UTC)
    return None


def _death_count(headers: Mapping[str, object]) -> int:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        count = deaths[0].get("count")
        if isinstance(count, int):
            return count
    return 0


def dead_letter_reason(headers: Mapping[str, object]) -> str:
    """Why the message was dead-lettered: the handler's reason, else RabbitMQ's."""
    reason = headers.get(REASON_HEADER)
    if reason is not None:
        return text(reason)
    first = headers.get("x-first-death-reason")
    if first is not None:
        return text(first)
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return text(deaths[0].get("reason", "unknown"))
    return "unknown"
