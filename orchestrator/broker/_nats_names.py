"""Names on NATS JetStream: a prefix's stream, its topics' subjects and durable consumers.

One stream per `topic_prefix` holds every topic of the deployments sharing
that prefix, and their dead letters:

- stream `ORCHESTRATOR` (or `ORCHESTRATOR-<prefix>`), subjects `<prefix>orchestrator.>`;
- a topic's messages on `<prefix>orchestrator.t.<topic>`, consumed by the durable
  pull consumer `t-<topic>`;
- its dead letters on `<prefix>orchestrator.dlq.<topic>`, taken by `dlq-<topic>`.

Consumer and stream names may hold neither dots nor wildcards: a name that
had to be changed to fit gets a hash of the original, so two topics never
share a consumer.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from orchestrator.config import BrokerSettings

__all__ = ["NatsNames", "check_topic"]

_SAFE = re.compile(r"[A-Za-z0-9_-]+")
_UNSAFE_CHARACTER = re.compile(r"[^A-Za-z0-9_-]")
_SUBJECT_TOKEN = re.compile(r"[^\s*>.]+")


def check_topic(topic: str) -> None:
    """Raise ValueError unless `topic` can end a NATS subject (dot-separated tokens, no
    whitespace, no wildcards)."""
    if not topic or not all(_SUBJECT_TOKEN.fullmatch(token) for token in topic.split(".")):
        raise ValueError(
            f"topic {topic!r} cannot be a NATS subject: use dot-separated tokens without "
            "whitespace, '*' or '>'"
        )


def _safe_name(text: str) -> str:
    """`text` as a stream or consumer name: itself when it fits, else cleaned and hashed."""
    if _SAFE.fullmatch(text):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{_UNSAFE_CHARACTER.sub('_', text)}-{digest}"


@dataclass(frozen=True, slots=True)
class NatsNames:
    """The names a `BrokerSettings`' topics have on NATS JetStream."""

    stream: str
    """The stream holding every topic and dead letter of the prefix."""
    root: str
    """The subject every subject of the stream starts with."""

    @classmethod
    def of(cls, settings: BrokerSettings) -> NatsNames:
        """The names of `settings.topic_prefix`."""
        prefix = settings.topic_prefix
        stream = "ORCHESTRATOR"
        if prefix:
            stream = f"{stream}-{_safe_name(prefix.rstrip('.'))}"
        return cls(stream=stream, root=f"{prefix}orchestrator")

    @property
    def subjects(self) -> str:
        """The stream's subject filter."""
        return f"{self.root}.>"

    def subject(self, topic: str) -> str:
        """Where `topic`'s messages are published."""
        return f"{self.root}.t.{topic}"

    def dead_letter_subject(self, topic: str) -> str:
        """Where `topic`'s dead letters are published."""
        return f"{self.root}.dlq.{topic}"

    def consumer(self, topic: str) -> str:
        """The durable consumer of `topic`, shared by every replica."""
        return f"t-{_safe_name(topic)}"

    def dead_letter_consumer(self, topic: str) -> str:
        """The durable consumer of `topic`'s dead letters."""
        return f"dlq-{_safe_name(topic)}"
