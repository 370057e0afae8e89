"""The dead-letter list: messages that left their topics for good, joined to their sagas.

Every replica takes what waits in its facades' dead-letter queues into the
saga store (`SagaStore.add_dead_letter`), one message at a time, each removed
from the broker only once it is kept, and keyed by an id made when it was
dead-lettered, so a replica that dies in between keeps it once. From there
operators list, replay and discard them (`orchestrator.admin`), whatever
broker holds the topic.

A message is joined to the saga it was for by its topic (which names the
facade and the step: every topic belongs to one facade) and by the request id
in its body (a hop's DTO, a rollback message); one that names no saga is kept
with an empty request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from orchestrator.broker.base import Broker, DeadLetteredMessage
from orchestrator.errors import BrokerUnavailable
from orchestrator.metrics import Metrics
from orchestrator.request_id import MAX_REQUEST_ID_LENGTH
from orchestrator.store import NewDeadLetter, SagaStore

__all__ = ["CLOSE_GRACE_SECONDS", "ROUND_LIMIT", "DeadLetterCollector", "Route"]

log = logging.getLogger("orchestrator.dead_letters")

ROUND_LIMIT = 100
"""Most dead letters taken from one topic in one round; the next round takes the rest."""
CLOSE_GRACE_SECONDS = 10.0
"""How long closing waits for a round under way."""


@dataclass(frozen=True, slots=True)
class Route:
    """Whose a topic is: the facade, and the step its messages run (`rollback` for the
    rollback topic)."""

    facade: str
    step: str


class DeadLetterCollector:
    """Takes the dead letters of `routes`' topics from `broker` into `store`, every
    `interval` seconds (and on `collect_now`)."""

    def __init__(
        self,
        broker: Broker,
        store: SagaStore,
        routes: Mapping[str, Route],
        metrics: Metrics,
        *,
        interval: float,
    ) -> None:
        self.broker = broker
        self.store = store
        self.routes = dict(routes)
        self.metrics = metrics
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        """Collect in the background until `close`."""
        if self._task is None:
            self._stopping = asyncio.Event()
            self._task = asyncio.create_task(self._keep_collecting(), name="dead-letters")

    async def close(self) -> None:
        """Stop collecting: a round under way finishes first (within `CLOSE_GRACE_SECONDS`;
        cancelled past it, a message being kept goes back to its queue). Cancelling a
        round mid-way would cut a broker operation in the middle."""
        if self._task is None:
            return
        self._stopping.set()
        done, _ = await asyncio.wait({self._task}, timeout=CLOSE_GRACE_SECONDS)
        if not done:
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def collect_now(self) -> int:
        """Take every topic's waiting dead letters (up to `ROUND_LIMIT` each); how many."""
        taken = 0
        for topic in self.routes:
            taken += await self.broker.take_dead_letters(topic, self._keep, limit=ROUND_LIMIT)
        return taken

    async def _keep_collecting(self) -> None:
        while not self._stopping.is_set():
            try:
                if self.broker.healthy:  # a round on a lost link would only wait
                    await self.collect_now()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # aiormq cancels the operations of a connection it lost: the broker failed.
                log.info("dead letters not collected: the broker connection was lost")
            except BrokerUnavailable as exc:
                log.info(
                    "dead letters not collected: broker unavailable", extra={"error": str(exc)}
                )
            except Exception:
                # The next round retries: a message is removed only once it is kept.
                log.exception("collecting dead letters failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)

    async def _keep(self, letter: DeadLetteredMessage) -> None:
        route = self.routes.get(letter.topic, Route("", ""))
        request_id = _request_id(letter.body)
        kept = await self.store.add_dead_letter(
            NewDeadLetter(
                id=letter.id or _fallback_id(letter),
                topic=letter.topic,
                facade=route.facade,
                request_id=request_id,
                step=route.step,
                message_id=letter.message_id[:512],
                body=letter.body,
                headers=dict(letter.headers),
                reason=letter.reason,
                delivery_count=letter.delivery_count,
                dead_lettered_at=letter.dead_lettered_at or datetime.now(UTC),
            )
        )
        if kept:
            self.metrics.dead_letters_kept.labels(letter.topic).inc()
            log.warning(
                "dead letter kept for an operator",
                extra={
                    "topic": letter.topic,
                    "facade": route.facade,
                    "request_id": request_id,
                    "reason": letter.reason,
                },
            )


def _request_id(body: bytes) -> str:
    """The request id a message names (a DTO's or a rollback's `request_id`), or ''."""
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return ""
    found = message.get("request_id") if isinstance(message, dict) else None
    if not isinstance(found, str) or not 0 < len(found) <= MAX_REQUEST_ID_LENGTH:
        return ""
    return found


def _fallback_id(letter: DeadLetteredMessage) -> str:
    seed = f"{letter.topic}\n{letter.message_id}\n{letter.reason}".encode() + letter.body
    return hashlib.sha256(seed).hexdigest()[:32]
