"""What a message carries on NATS JetStream: its id, its headers, its dead-letter facts.

A message's id travels as `Nats-Msg-Id`, which JetStream uses to drop a
second publish within its duplicate window. When a message must be stored
again under an id the window still remembers (a replay of a message long
consumed), it goes under a fresh `Nats-Msg-Id` with its own id in
`MESSAGE_ID_HEADER`. Headers JetStream owns (`Nats-*`) never reach handlers.

Header values are one line of text: line breaks in a reason become spaces.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime

from nats.aio.msg import Msg

from orchestrator.broker.base import (
    DEAD_LETTER_ID_HEADER,
    DEAD_LETTERED_AT_HEADER,
    DELIVERIES_HEADER,
    REASON_HEADER,
    DeadLetteredMessage,
    Delivery,
)

__all__ = [
    "MESSAGE_ID_HEADER",
    "MSG_ID",
    "TOPIC_HEADER",
    "dead_letter_headers",
    "dead_lettered",
    "delivery_of",
    "letter_id",
    "message_id_of",
    "one_line",
    "user_headers",
]

MSG_ID = "Nats-Msg-Id"
"""JetStream's de-duplication header."""
MESSAGE_ID_HEADER = "x-orchestrator-message-id"
"""The message's id, when its `Nats-Msg-Id` had to differ (see the module docstring)."""
TOPIC_HEADER = "x-orchestrator-topic"
"""Header of a dead letter: the topic it left (as on RabbitMQ)."""
_OWN = (MESSAGE_ID_HEADER,)


def one_line(value: str) -> str:
    """`value` fit for a NATS header: no line breaks, no surrounding blanks."""
    return " ".join(value.splitlines()).strip()


def user_headers(raw: Mapping[str, str] | None) -> dict[str, str]:
    """A message's headers without JetStream's and the broker's own."""
    if not raw:
        return {}
    return {k: v for k, v in raw.items() if not k.startswith("Nats-") and k not in _OWN}


def message_id_of(raw: Mapping[str, str] | None) -> str:
    """The id a message was published with."""
    if not raw:
        return ""
    if MESSAGE_ID_HEADER in raw:
        return raw[MESSAGE_ID_HEADER]
    return raw.get(MSG_ID, "")


def delivery_of(topic: str, msg: Msg) -> Delivery:
    """A JetStream message as the broker contract hands it to a handler."""
    return Delivery(
        topic=topic,
        body=msg.data,
        message_id=message_id_of(msg.headers),
        headers=user_headers(msg.headers),
        delivery_count=msg.metadata.num_delivered,
    )


def letter_id(stream: str, sequence: int, stored_at: datetime | None) -> str:
    """The dead-letter id of the message stored at `sequence` of `stream`: the same however
    often it is dead-lettered (a crash between the copy and `term()`), so kept once."""
    seed = f"{stream}\n{sequence}\n{stored_at.isoformat() if stored_at else ''}"
    return hashlib.sha256(seed.encode()).hexdigest()[:32]


def dead_letter_headers(
    topic: str,
    raw: Mapping[str, str] | None,
    *,
    reason: str,
    letter: str,
    deliveries: int,
) -> dict[str, str]:
    """The headers of a message's dead-letter copy: its own and the dead-letter facts."""
    return {
        **user_headers(raw),
        MESSAGE_ID_HEADER: message_id_of(raw),
        REASON_HEADER: one_line(reason) or "unknown",
        TOPIC_HEADER: topic,
        DEAD_LETTER_ID_HEADER: letter,
        DEAD_LETTERED_AT_HEADER: datetime.now(UTC).isoformat(),
        DELIVERIES_HEADER: str(deliveries),
    }


def dead_lettered(topic: str, msg: Msg) -> DeadLetteredMessage:
    """A message taken from a dead-letter subject, as the broker contract hands it over."""
    raw = msg.headers or {}
    headers = user_headers(raw)
    at = None
    with contextlib.suppress(ValueError):
        at = datetime.fromisoformat(raw.get(DEAD_LETTERED_AT_HEADER, ""))
    deliveries = raw.get(DELIVERIES_HEADER, "")
    return DeadLetteredMessage(
        topic=topic,
        body=msg.data,
        message_id=message_id_of(raw),
        reason=raw.get(REASON_HEADER, "unknown"),
        headers=headers,
        delivery_count=int(deliveries) if deliveries.isdigit() else 0,
        dead_lettered_at=at,
        id=raw.get(DEAD_LETTER_ID_HEADER) or raw.get(MSG_ID, ""),
    )
