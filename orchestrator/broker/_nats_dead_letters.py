"""Dead letters on JetStream, which has no dead-letter queue of its own.

A message given up is copied, with its reason, to its topic's dead-letter
subject (`<root>.dlq.<topic>`) and only then `term`ed, so it is in one place
or the other, never in none. The copy's `Nats-Msg-Id` is its dead-letter id,
made from the message's place in the stream: dead-lettering it twice (a crash
between the copy and `term`) stores it once within the duplicate window, and
the collector keeps it once by that id after it.

A message whose consumer gave up on it by itself (`max_deliver` reached
without a handler finishing: a process dying on its last delivery) stays in a
work-queue stream with no one to deliver it to. JetStream announces it with a
`MAX_DELIVERIES` advisory; every broker listens for those of its stream and
dead-letters the message from the stream itself, then deletes it there.

Dead letters are taken one at a time through the topic's dead-letter consumer
and acknowledged (and the acknowledgement confirmed) only once kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping

import nats.errors
import nats.js
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from orchestrator.broker._nats_link import NatsLink
from orchestrator.broker._nats_messages import dead_letter_headers, dead_lettered, letter_id
from orchestrator.broker._nats_names import NatsNames
from orchestrator.broker._nats_publisher import NatsPublisher
from orchestrator.broker._nats_topology import timed
from orchestrator.broker.base import DeadLetterKeeper
from orchestrator.config import BrokerSettings
from orchestrator.errors import BrokerUnavailable

__all__ = ["NatsDeadLetters"]

log = logging.getLogger("orchestrator.broker.nats")

_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.*"
_TAKE_WAIT_SECONDS = 1.0


class NatsDeadLetters:
    """The dead letters of `names`' stream: sent, watched for and taken."""

    def __init__(
        self,
        link: NatsLink,
        settings: BrokerSettings,
        names: NatsNames,
        publisher: NatsPublisher,
        count: Callable[[str], None],
    ) -> None:
        self._link = link
        self._settings = settings
        self._names = names
        self._publisher = publisher
        self._count = count
        self._advisories: Subscription | None = None
        self._rescues: set[asyncio.Task[None]] = set()

    # -- sending -----------------------------------------------------------

    async def send(self, topic: str, msg: Msg, reason: str) -> bool:
        """Copy a delivered message to `topic`'s dead letters, then `term` it; False (and
        nothing settled) when the copy was not acknowledged."""
        meta = msg.metadata
        letter = letter_id(meta.stream, meta.sequence.stream, meta.timestamp)
        copied = await self._copy(
            topic,
            body=msg.data,
            headers=msg.headers,
            letter=letter,
            deliveries=meta.num_delivered,
            reason=reason,
        )
        if not copied:
            return False
        with contextlib.suppress(nats.errors.Error, OSError):
            # Lost, the message comes back once more and its copy is dropped as a duplicate.
            await msg.term()
        return True

    async def _copy(
        self,
        topic: str,
        *,
        body: bytes,
        headers: Mapping[str, str] | None,
        letter: str,
        deliveries: int,
        reason: str,
    ) -> bool:
        fields = dead_letter_headers(
            topic, headers, reason=reason, letter=letter, deliveries=deliveries
        )
        deadline = asyncio.get_running_loop().time() + self._settings.publish_timeout_seconds
        try:
            await self._publisher.publish(
                self._names.dead_letter_subject(topic),
                body,
                message_id=letter,
                headers=fields,
                deadline=deadline,
                again_once_consumed=False,
            )
        except BrokerUnavailable as exc:
            log.error(
                "cannot dead-letter, keeping the message",
                extra={"topic": topic, "reason": reason, "error": str(exc)},
            )
            return False
        self._count(topic)
        log.error(
            "message dead-lettered",
            extra={"topic": topic, "message_id": fields.get("x-orchestrator-message-id", "")},
        )
        return True

    # -- what JetStream gave up by itself -------------------------------------

    async def watch(self) -> None:
        """Listen for the stream's max-deliveries advisories (again after a restart)."""
        if self._advisories is None:
            subject = _ADVISORY.format(stream=self._names.stream)
            self._advisories = await self._link.client.subscribe(subject, cb=self._on_advisory)

    async def close(self) -> None:
        """Stop listening; rescues under way finish first (each within its deadlines)."""
        if self._advisories is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._advisories.unsubscribe()
            self._advisories = None
        await asyncio.gather(*self._rescues, return_exceptions=True)

    async def _on_advisory(self, advisory: Msg) -> None:
        try:
            event = json.loads(advisory.data)
            sequence = int(event["stream_seq"])
            deliveries = int(event.get("deliveries", 0))
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable JetStream advisory", extra={"subject": advisory.subject})
            return
        task = asyncio.create_task(self._rescue(sequence, deliveries))
        self._rescues.add(task)
        task.add_done_callback(self._rescues.discard)

    async def _rescue(self, sequence: int, deliveries: int) -> None:
        """Dead-letter the message at `sequence`, given up by JetStream, and delete it."""
        stream, js = self._names.stream, self._link.js
        try:
            stored = await timed(
                self._link, self._settings, js.get_msg(stream, sequence), "read a message"
            )
        except BrokerUnavailable as exc:
            if not isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                log.error("cannot rescue a message JetStream gave up", extra={"error": str(exc)})
            return  # gone already: another replica rescued it
        topic_root = f"{self._names.root}.t."
        subject = stored.subject or ""
        if not subject.startswith(topic_root):
            return
        topic = subject[len(topic_root) :]
        limit = self._settings.delivery_limit
        reason = (
            f"delivery limit {limit} reached: JetStream gave it up after {deliveries} "
            "deliveries (max_deliver) with no handler finished"
        )
        letter = letter_id(stream, sequence, stored.time)
        copied = await self._copy(
            topic,
            body=stored.data or b"",
            headers=stored.headers,
            letter=letter,
            deliveries=deliveries,
            reason=reason,
        )
        if not copied:
            return
        with contextlib.suppress(BrokerUnavailable):
            await timed(
                self._link, self._settings, js.delete_msg(stream, sequence), "delete a message"
            )

    # -- taking ------------------------------------------------------------

    async def take(self, topic: str, keep: DeadLetterKeeper, *, limit: int) -> int:
        """Hand up to `limit` of `topic`'s dead letters to `keep`, each acknowledged once
        kept; a `keep` that raises gives its letter back and ends the round."""
        js, stream = self._link.js, self._names.stream
        consumer = self._names.dead_letter_consumer(topic)
        try:
            info = await timed(
                self._link,
                self._settings,
                js.consumer_info(stream, consumer),
                "look for dead letters",
            )
        except BrokerUnavailable as exc:
            if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                return 0  # never declared: nothing was dead-lettered
            raise
        # Not yet delivered, or delivered and not acknowledged (given back by a keeper
        # that failed, or being taken by another replica).
        waiting = min(limit, (info.num_pending or 0) + (info.num_ack_pending or 0))
        if waiting == 0:
            return 0
        pull = await timed(
            self._link,
            self._settings,
            js.pull_subscribe_bind(consumer, stream),
            "take dead letters",
        )
        try:
            return await self._take(topic, pull, keep, waiting)
        finally:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                async with asyncio.timeout(2):
                    await pull.unsubscribe()

    async def _take(
        self,
        topic: str,
        pull: nats.js.JetStreamContext.PullSubscription,
        keep: DeadLetterKeeper,
        waiting: int,
    ) -> int:
        taken = 0
        while taken < waiting:
            try:
                [msg] = await pull.fetch(1, timeout=_TAKE_WAIT_SECONDS)
            except TimeoutError:
                break  # taken by another replica meanwhile
            except (nats.errors.Error, OSError) as exc:
                raise BrokerUnavailable(
                    f"cannot take dead letters: {self._link.describe(exc)}"
                ) from exc
            try:
                await keep(dead_lettered(topic, msg))
            except Exception:
                # The keeper's failure, not the broker's: raised as it is.
                with contextlib.suppress(nats.errors.Error, OSError):
                    await msg.nak()
                raise
            try:
                await msg.ack_sync(timeout=self._settings.publish_timeout_seconds)
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                # Kept, yet not removed: it comes back, and is kept once by its id.
                raise BrokerUnavailable(
                    f"cannot remove a kept dead letter: {self._link.describe(exc)}"
                ) from exc
            taken += 1
        return taken
