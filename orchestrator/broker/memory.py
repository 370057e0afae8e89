"""An in-process broker with RabbitMQ's semantics, for the embedded default and unit tests.

Messages live in memory: they survive nothing but the broker object. It is
the default so that `python main.py` needs nothing installed; production uses
RabbitMQ through the same protocol. A closed broker may be started and
subscribed to again, its queues and dead letters kept: the test kit
(`orchestrator.testing`) lets it stand for a broker that outlives an
orchestrator that crashed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

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

__all__ = ["InMemoryBroker"]

log = logging.getLogger("orchestrator.broker.memory")


@dataclass(slots=True)
class _Message:
    body: bytes
    message_id: str
    headers: Mapping[str, str]
    delivery_count: int = 0
    outages: int = 0
    retried: bool = False  # the last attempt failed because of the broker


class InMemoryBroker(Broker):
    """Topics are asyncio queues; failed deliveries come back after a short backoff."""

    def __init__(self, settings: BrokerSettings | None = None) -> None:
        super().__init__()
        self._settings = settings or BrokerSettings()
        self._queues: dict[str, asyncio.Queue[_Message]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._stopping: list[asyncio.Task[None]] = []
        # Deliveries waiting out their redelivery delay, each with the queue it goes back to.
        self._delayed: dict[asyncio.TimerHandle, tuple[asyncio.Queue[_Message], _Message]] = {}
        self._unfinished = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.dead_letters: list[DeadLetteredMessage] = []
        """Every message dead-lettered so far, in order (taken or not)."""
        self._untaken: dict[str, list[DeadLetteredMessage]] = {}

    async def start(self) -> None:
        """Nothing to connect to: the broker is healthy at once."""
        self._set_healthy(True)

    async def close(self) -> None:
        """Stop the consumers (see `drop_consumers`); the queues stay with the object."""
        self.drop_consumers()
        stopping, self._stopping = self._stopping, []
        await asyncio.gather(*stopping, return_exceptions=True)
        self._set_healthy(False)

    def drop_consumers(self) -> None:
        """Stop every consumer at once, as when the process consuming dies.

        Nothing in flight is acknowledged: a delivery being handled goes back
        to its topic when its worker stops, and one waiting out its redelivery
        delay goes back now. `close()` waits for the workers; `start()` and
        `subscribe()` may follow, and the queues are consumed again.
        """
        for handle, (queue, message) in self._delayed.items():
            handle.cancel()
            queue.put_nowait(message)
        self._delayed.clear()
        for worker in self._workers:
            worker.cancel()
        self._stopping.extend(self._workers)
        self._workers = []

    async def declare(self, topic: str) -> None:
        """Create the topic's queue if it does not exist."""
        self._queue(topic)

    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (merged with publish_timeout_seconds)
    ) -> None:
        """Enqueue the message at once; raises UnroutableError when the topic was never
        declared, QueueFull when its queue holds its `max_length` messages waiting.

        Only a `timeout` with no time left (<= 0) matters: it raises
        BrokerUnavailable, as RabbitMQ's would.
        """
        if timeout is not None and timeout <= 0:
            raise BrokerUnavailable(f"no time left to publish message {message_id}")
        queue = self._queues.get(topic)
        if queue is None:
            raise UnroutableError(f"no queue for topic {topic!r}")
        limit = self._settings.max_length_of(topic)
        if limit is not None and queue.qsize() >= limit:
            raise QueueFull(f"topic {topic!r} holds {limit} messages, its max_length")
        self._enqueue(queue, _Message(body, message_id, dict(headers or {})))

    async def subscribe(self, topic: str, handler: MessageHandler) -> None:
        """Start the topic's concurrency in worker tasks, each handling one delivery at a time."""
        queue = self._queue(topic)
        for _ in range(self._settings.concurrency_of(topic)):
            self._workers.append(asyncio.create_task(self._consume(topic, queue, handler)))

    async def join(self) -> None:
        """Wait until every published message has been handled, acknowledged or dead-lettered."""
        await self._idle.wait()

    def depth(self, topic: str) -> int:
        """Messages waiting in the topic's queue."""
        queue = self._queues.get(topic)
        return queue.qsize() if queue else 0

    def _queue(self, topic: str) -> asyncio.Queue[_Message]:
        return self._queues.setdefault(topic, asyncio.Queue())

    def _enqueue(self, queue: asyncio.Queue[_Message], message: _Message) -> None:
        self._unfinished += 1
        self._idle.clear()
        queue.put_nowait(message)

    def _finish(self) -> None:
        self._unfinished -= 1
        if self._unfinished == 0:
            self._idle.set()

    async def _consume(
        self, topic: str, queue: asyncio.Queue[_Message], handler: MessageHandler
    ) -> None:
        while True:
            message = await queue.get()
            message.delivery_count += 1
            delivery = Delivery(
                topic=topic,
                body=message.body,
                message_id=message.message_id,
                headers=message.headers,
                delivery_count=message.delivery_count,
                retried=message.retried,
            )
            try:
                await handler(delivery)
            except asyncio.CancelledError:
                # Shutting down: the delivery was not acknowledged, so it goes back.
                queue.put_nowait(message)
                raise
            except DeadLetter as exc:
                self._dead_letter(topic, message, str(exc))
            except BrokerUnavailable as exc:
                if isinstance(exc, UnroutableError):
                    self._retry_or_dead_letter(topic, queue, message, exc)
                else:
                    # The broker failed, not the message: this attempt does not count,
                    # but the next one is a retry of it.
                    message.delivery_count -= 1
                    message.outages += 1
                    message.retried = True
                    self._requeue_later(queue, message, min(0.05 * 2**message.outages, 2.0))
            except Exception as exc:
                self._retry_or_dead_letter(topic, queue, message, exc)
            else:
                self._finish()

    def _retry_or_dead_letter(
        self, topic: str, queue: asyncio.Queue[_Message], message: _Message, exc: Exception
    ) -> None:
        limit = self._settings.delivery_limit
        if message.delivery_count >= limit:
            self._dead_letter(topic, message, f"delivery limit {limit} reached: {exc!r}")
            return
        self._count_redelivery(topic)
        log.warning(
            "handler failed, redelivering",
            extra={"topic": topic, "message_id": message.message_id, "error": repr(exc)},
        )
        message.retried = False  # a new delivery, counted as such
        delay = self._settings.redelivery_delay_seconds * message.delivery_count
        self._requeue_later(queue, message, delay)

    def _requeue_later(
        self, queue: asyncio.Queue[_Message], message: _Message, delay: float
    ) -> None:
        def requeue() -> None:
            del self._delayed[handle]
            queue.put_nowait(message)

        handle = asyncio.get_running_loop().call_later(delay, requeue)
        self._delayed[handle] = (queue, message)

    def _dead_letter(self, topic: str, message: _Message, reason: str) -> None:
        self._count_dead_letter(topic)
        log.error(
            "message dead-lettered",
            extra={"topic": topic, "message_id": message.message_id, "reason": reason},
        )
        now = datetime.now(UTC)
        letter_id = uuid.uuid4().hex
        headers = {
            **message.headers,
            REASON_HEADER: reason,
            DEAD_LETTER_ID_HEADER: letter_id,
            DEAD_LETTERED_AT_HEADER: now.isoformat(),
            DELIVERIES_HEADER: str(message.delivery_count),
        }
        letter = DeadLetteredMessage(
            topic,
            message.body,
            message.message_id,
            reason,
            headers=headers,
            delivery_count=message.delivery_count,
            dead_lettered_at=now,
            id=letter_id,
        )
        self.dead_letters.append(letter)
        self._untaken.setdefault(topic, []).append(letter)
        self._finish()

    async def take_dead_letters(self, topic: str, keep: DeadLetterKeeper, *, limit: int) -> int:
        """Hand the topic's untaken dead letters to `keep`, oldest first."""
        waiting = self._untaken.get(topic, [])
        taken = 0
        while waiting and taken < limit:
            await keep(waiting[0])
            waiting.pop(0)
            taken += 1
        return taken
