"""The broker protocol: what a facade needs from a message broker.

Semantics every implementation keeps:

- `publish` returns only once the broker has taken responsibility for the
  message (a publisher confirm); it raises BrokerUnavailable otherwise, and
  UnroutableError when no queue exists for the topic. A topic this broker
  declared whose queue was deleted since is declared again (and consumed
  again, when this broker consumes it) and the publish retried once.
- A publish to a topic with a length limit (`TopicSettings.max_length`) that
  finds its queue holding that many messages is refused with QueueFull (a
  BrokerUnavailable: a consumer that meets it is retried in place, as in an
  outage, until the queue has room); nothing is enqueued.
- A publish never outlives its caller: it returns or raises within its
  `timeout` (at most `publish_timeout_seconds`), however the broker fails,
  a half-open connection that answers nothing included. A publish that timed
  out may still have reached the broker: a retry can make a duplicate.
- While the broker refuses publishes for a time (RabbitMQ blocking the
  connection on a memory or disk alarm), it is not `healthy`, and `publish`
  fails at once with BrokerUnavailable naming the broker's reason.
- A handler's delivery is acknowledged only after the handler returns, so
  whatever the handler published first is safe before the input is dropped.
- A handler that raises DeadLetter sends the delivery to the dead-letter queue
  with its reason; any other exception requeues it, up to the delivery limit,
  after which it is dead-lettered too. Nothing is requeued in a loop forever.
- A handler that raises BrokerUnavailable (other than UnroutableError) failed
  because of the broker, not the message: it is retried once the broker
  recovers, without spending the delivery limit meant for poison messages.
  That retry keeps its delivery count but is marked `retried`, so it counts as
  `redelivered`: whatever the failed attempt did may have happened in part.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import grpc

from orchestrator.errors import BrokerUnavailable
from orchestrator.metrics import Metrics

__all__ = [
    "Broker",
    "BrokerUnavailable",
    "DeadLetter",
    "DeadLetterKeeper",
    "DeadLetteredMessage",
    "Delivery",
    "MessageHandler",
    "QueueFull",
    "UnroutableError",
]

REASON_HEADER = "x-orchestrator-reason"
"""Header of a dead-lettered message: why its handler gave up on it."""
DEAD_LETTER_ID_HEADER = "x-orchestrator-dead-letter-id"
"""Header of a dead-lettered message: an id made when it was dead-lettered, so that keeping
it twice (a crash between keeping and acknowledging) keeps it once."""
DEAD_LETTERED_AT_HEADER = "x-orchestrator-dead-lettered-at"
"""Header of a dead-lettered message: when, as ISO 8601 UTC."""
DELIVERIES_HEADER = "x-orchestrator-deliveries"
"""Header of a dead-lettered message: how many times it had been delivered."""


class DeadLetter(Exception):
    """Raised by a handler: this delivery can never succeed; dead-letter it with the reason."""


class UnroutableError(BrokerUnavailable):
    """A publish reached no queue: a message the broker would silently drop."""


class QueueFull(BrokerUnavailable):
    """The topic's queue holds as many messages as its length limit: the publish was refused.

    For the broker contract it is an outage (a consumer that meets it is retried in
    place until the queue has room); a caller refused for it gets RESOURCE_EXHAUSTED.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed to a handler."""

    topic: str
    body: bytes
    message_id: str
    headers: Mapping[str, str] = field(default_factory=dict)
    delivery_count: int = 1
    """Deliveries of this message so far, this one included; in-place retries do not count."""
    retried: bool = False
    """True when this consumer handled this delivery before and failed because of the broker
    (BrokerUnavailable): an in-place retry, which does not spend the delivery limit."""

    @property
    def redelivered(self) -> bool:
        """True when an earlier attempt at this message did not finish, in place or not."""
        return self.delivery_count > 1 or self.retried


@dataclass(frozen=True, slots=True)
class DeadLetteredMessage:
    """A message that left its topic for the dead-letter queue, and why."""

    topic: str
    body: bytes
    message_id: str
    reason: str
    headers: Mapping[str, str] = field(default_factory=dict)
    """Its headers (trace context, the dead-letter headers above)."""
    delivery_count: int = 0
    """How many times it was delivered before it was dead-lettered (0: unknown)."""
    dead_lettered_at: datetime | None = None
    """When it was dead-lettered (None: unknown)."""
    id: str = ""
    """Stable for this dead-lettering of the message (see `DEAD_LETTER_ID_HEADER`)."""


DeadLetterKeeper = Callable[[DeadLetteredMessage], Awaitable[None]]
"""Takes a dead letter over (`Broker.take_dead_letters`); raising leaves it in the broker."""


MessageHandler = Callable[[Delivery], Awaitable[None]]
HealthListener = Callable[[bool], None]


class Broker(abc.ABC):
    """A topic broker with at-least-once delivery; see the module docstring."""

    def __init__(self) -> None:
        self._health_listeners: list[HealthListener] = []
        self._healthy = False
        self._metrics: Metrics | None = None

    def attach_metrics(self, metrics: Metrics) -> None:
        """Count redeliveries, dead letters and the connection state into `metrics`."""
        self._metrics = metrics
        metrics.broker_connected.set(1 if self._healthy else 0)

    def _count_redelivery(self, topic: str) -> None:
        if self._metrics is not None:
            self._metrics.redeliveries.labels(topic).inc()

    def _count_dead_letter(self, topic: str) -> None:
        if self._metrics is not None:
            self._metrics.dead_lettered.labels(topic).inc()

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and declare what is needed; idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop consuming and disconnect; unacknowledged deliveries go back to their topics."""

    @abc.abstractmethod
    async def declare(self, topic: str) -> None:
        """Make sure the topic's queue exists, so a publish to it is kept before anyone consumes."""

    @abc.abstractmethod
    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (merged with publish_timeout_seconds)
    ) -> None:
        """Publish and wait for the confirm; raises BrokerUnavailable or UnroutableError.

        `timeout` caps the wait: None means `publish_timeout_seconds`, any other
        value the smaller of the two; none left (<= 0) publishes nothing and
        raises BrokerUnavailable.
        """

    @abc.abstractmethod
    async def subscribe(self, topic: str, handler: MessageHandler) -> None:
        """Consume `topic` with `handler`, as many at once as the topic's concurrency allows."""

    @abc.abstractmethod
    async def take_dead_letters(self, topic: str, keep: DeadLetterKeeper, *, limit: int) -> int:
        """Hand up to `limit` messages waiting in `topic`'s dead-letter queue to `keep`, one at
        a time, each removed from the broker only once `keep` returned; how many were taken.

        A `keep` that raises stops the round and leaves that message where it
        was. Raises BrokerUnavailable when the broker cannot be reached.
        """

    @property
    def healthy(self) -> bool:
        """True while the broker is reachable and takes publishes."""
        return self._healthy

    def add_health_listener(self, listener: HealthListener) -> None:
        """Call `listener(healthy)` on every change of `healthy`."""
        self._health_listeners.append(listener)

    def _set_healthy(self, healthy: bool) -> None:
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if self._metrics is not None:
            self._metrics.broker_connected.set(1 if healthy else 0)
        for listener in self._health_listeners:
            listener(healthy)
