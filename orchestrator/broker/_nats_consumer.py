"""Consuming a topic on JetStream: a durable pull consumer, `concurrency` handlers at once.

One pull loop per subscription asks the topic's durable consumer for as many
messages as it has free handler slots (a lingering request of one message
while idle, then what else is ready), and runs each message's handler in a
task of its own. The slots are the topic's concurrency: never more handlers
at once, and messages beyond them stay in the stream for other replicas.

Each message is settled after its handler, as the broker contract says:

- returned: `ack` (whatever it published was acknowledged by then);
- raised DeadLetter, or failed on its `delivery_limit`-th delivery: copied to
  the topic's dead-letter subject with the reason, then `term` (`Host.dead_letter`);
- raised anything else: `nak` with a backoff of `redelivery_delay_seconds` times
  its delivery count;
- raised BrokerUnavailable: retried in place, its delivery count unspent;
- delivered once more than `delivery_limit` (its handler never finished: the
  process died, or it outlived `ack_wait_seconds` without reporting progress):
  dead-lettered without running the handler.

A handler running longer than a third of `ack_wait_seconds` reports progress
so JetStream does not deliver its message to someone else meanwhile. A pull
loop that finds its consumer gone (deleted behind the broker's back) has the
topic declared again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable
from typing import Protocol

import nats.errors
import nats.js
import nats.js.errors
from nats.aio.msg import Msg

from orchestrator.broker._nats_messages import delivery_of
from orchestrator.broker.base import DeadLetter, Delivery, MessageHandler, UnroutableError
from orchestrator.config import BrokerSettings
from orchestrator.errors import BrokerUnavailable

__all__ = ["Host", "NatsSubscription"]

log = logging.getLogger("orchestrator.broker.nats")

_FetchErrors = (nats.errors.Error, OSError)


class Host(Protocol):
    """What a subscription needs from its broker."""

    settings: BrokerSettings

    @property
    def closing(self) -> bool:
        """True once the broker is closing: nothing new is started."""

    @property
    def connected(self) -> bool:
        """True while the connection to the server is up."""

    async def bind(self, topic: str) -> nats.js.JetStreamContext.PullSubscription:
        """A pull subscription on `topic`'s durable consumer."""

    async def consumer_exists(self, topic: str) -> bool:
        """True when `topic`'s consumer exists."""

    async def restore(self, topic: str) -> None:
        """Declare `topic` again (its consumer or stream was deleted)."""

    async def dead_letter(self, topic: str, msg: Msg, reason: str) -> bool:
        """Copy `msg` to `topic`'s dead letters and `term` it; False when it could not."""

    def count_redelivery(self, topic: str) -> None:
        """Count a redelivery of `topic`."""


@dataclasses.dataclass(slots=True)
class _InFlight:
    msg: Msg
    started: float
    settled: bool = False


class NatsSubscription:
    """`topic` consumed with `handler` through `host`, `concurrency` deliveries at once."""

    IDLE_WAIT_SECONDS = 1.0
    """How long an idle pull request lingers for a message (a new one follows at once)."""
    BURST_WAIT_SECONDS = 0.005
    """How long a pull for more ready messages waits, once one arrived."""
    CONSUMER_CHECK_SECONDS = 2.0
    """How often an idle or failing pull loop checks that its consumer still exists."""
    OUTAGE_RETRY_LIMIT = 30
    """In-place retries of a handler that failed with BrokerUnavailable (about a minute)."""

    def __init__(self, host: Host, topic: str, handler: MessageHandler) -> None:
        self.topic = topic
        self._host = host
        self._handler = handler
        self._concurrency = host.settings.concurrency_of(topic)
        self._inflight: dict[asyncio.Task[None], _InFlight] = {}
        self._slot_free = asyncio.Event()
        self._slot_free.set()
        self._puller: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._pull: nats.js.JetStreamContext.PullSubscription | None = None
        self._last_check = 0.0
        self._refusals = 0  # pulls answered at once with no message, in a row
        self._stopping = False

    def start(self) -> None:
        """Start pulling (and reporting progress of long handlers)."""
        self._puller = asyncio.create_task(self._pull_loop(), name=f"nats-pull-{self.topic}")
        self._ticker = asyncio.create_task(self._report_progress(), name=f"nats-wip-{self.topic}")

    async def stop(self, grace: float) -> None:
        """Stop pulling; let handlers finish for `grace` seconds, cancel the rest and give
        their messages back at once (`nak`)."""
        await self._stop_pulling()
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "cancelled handlers still running at close; their messages go back",
                    extra={"topic": self.topic, "count": len(pending)},
                )
                entries = [self._inflight[task] for task in pending]
                await asyncio.gather(*pending, return_exceptions=True)
                for entry in entries:
                    if not entry.settled:
                        await self._settle(entry, entry.msg.nak(), "nak")
        if self._pull is not None:
            with contextlib.suppress(*_FetchErrors, TimeoutError):
                async with asyncio.timeout(2):
                    await self._pull.unsubscribe()
            self._pull = None

    async def _stop_pulling(self) -> None:
        """Let a pull under way end by itself rather than cancel it: JetStream would keep
        its request, deliver the next message (one given back below, say) to an inbox no
        one reads, and roll that message's delivery count back when it finds out."""
        puller, self._puller = self._puller, None
        if puller is None:
            return
        self._stopping = True
        self._slot_free.set()  # a puller waiting for a slot sees `_stopping` at once
        done, _ = await asyncio.wait({puller}, timeout=self.IDLE_WAIT_SECONDS + 1)
        if not done:
            puller.cancel()
        await asyncio.gather(puller, return_exceptions=True)

    # -- pulling -----------------------------------------------------------

    async def _pull_loop(self) -> None:
        failures = 0
        while not self._stopping:
            await self._slot_free.wait()
            if self._stopping:
                return
            try:
                if self._pull is None:
                    self._pull = await self._host.bind(self.topic)
                msgs = await self._fetch(self._pull)
                failures = 0
            except BrokerUnavailable as exc:
                failures += 1
                await self._after_failure(failures, str(exc))
                continue
            except nats.js.errors.APIError as exc:
                # Typically no one answers for the consumer: it was deleted.
                failures += 1
                await self._after_failure(failures, repr(exc), check=True)
                continue
            except _FetchErrors as exc:
                failures += 1
                await self._after_failure(failures, repr(exc))
                continue
            if self._stopping:
                for msg in msgs:  # pulled as the broker closes: never handled here
                    with contextlib.suppress(*_FetchErrors):
                        await msg.nak()
                return
            for msg in msgs:
                self._dispatch(msg)

    async def _fetch(self, pull: nats.js.JetStreamContext.PullSubscription) -> list[Msg]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            msgs = await pull.fetch(1, timeout=self.IDLE_WAIT_SECONDS)
        except TimeoutError:
            if loop.time() - began >= self.IDLE_WAIT_SECONDS / 2:
                self._refusals = 0
                await self._check_consumer(idle=True)
            else:
                # Answered at once with no message: the late expiry of an earlier pull
                # (harmless), or, again and again, JetStream refusing the pull.
                self._refusals += 1
                if self._refusals >= 3:
                    await self._after_failure(self._refusals, "pull refused", check=True)
            return []
        self._refusals = 0
        free = self._concurrency - len(self._inflight) - len(msgs)
        if free > 0:
            with contextlib.suppress(TimeoutError):
                msgs += await pull.fetch(free, timeout=self.BURST_WAIT_SECONDS)
        return msgs

    async def _after_failure(self, failures: int, error: str, *, check: bool = False) -> None:
        if self._host.closing:
            await asyncio.sleep(0.1)
            return
        if failures == 3:
            log.warning("pulling messages failed", extra={"topic": self.topic, "error": error})
        if check:
            await self._check_consumer(idle=False)
        await asyncio.sleep(min(0.05 * 2**failures, 1.0))

    async def _check_consumer(self, *, idle: bool) -> None:
        """Now and then: declare the topic again if its consumer is gone."""
        now = asyncio.get_running_loop().time()
        if (
            now - self._last_check < self.CONSUMER_CHECK_SECONDS
            or not self._host.connected
            or self._host.closing
            or self._stopping
        ):
            return
        self._last_check = now
        try:
            if await self._host.consumer_exists(self.topic):
                return
            log.warning("topic's consumer is gone, declaring it again", extra={"topic": self.topic})
            await self._host.restore(self.topic)
        except BrokerUnavailable as exc:
            if not idle:
                log.info("cannot check the topic's consumer", extra={"error": str(exc)})

    def _dispatch(self, msg: Msg) -> None:
        entry = _InFlight(msg, asyncio.get_running_loop().time())
        task = asyncio.create_task(self._handle_safely(entry))
        self._inflight[task] = entry
        if len(self._inflight) >= self._concurrency:
            self._slot_free.clear()
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        if len(self._inflight) < self._concurrency:
            self._slot_free.set()

    async def _report_progress(self) -> None:
        every = self._host.settings.ack_wait_seconds / 3
        while True:
            await asyncio.sleep(every)
            now = asyncio.get_running_loop().time()
            for entry in list(self._inflight.values()):
                if not entry.settled and now - entry.started >= every:
                    with contextlib.suppress(*_FetchErrors):
                        await entry.msg.in_progress()

    # -- handling ----------------------------------------------------------

    async def _handle_safely(self, entry: _InFlight) -> None:
        try:
            await self._handle(entry)
        except Exception:
            # Nothing may escape a detached task; the unsettled message comes back
            # after its ack wait.
            log.exception("unexpected error while handling a delivery", extra={"topic": self.topic})

    async def _handle(self, entry: _InFlight) -> None:
        msg = entry.msg
        delivery = delivery_of(self.topic, msg)
        limit = self._host.settings.delivery_limit
        if delivery.delivery_count > limit:
            reason = f"delivery limit {limit} reached: its handler never finished"
            await self._dead_letter(entry, reason)
            return
        outage_retries = 0
        while True:
            try:
                await self._handler(delivery)
            except DeadLetter as exc:
                await self._dead_letter(entry, str(exc) or "dead-lettered by handler")
                return
            except UnroutableError as exc:
                await self._retry_or_dead_letter(entry, delivery, exc)
                return
            except BrokerUnavailable:
                # The broker failed, not the message: retrying must not spend
                # the delivery limit meant for poison messages.
                outage_retries += 1
                if not await self._await_recovery(entry, outage_retries):
                    return
                delivery = dataclasses.replace(delivery, retried=True)
                continue
            except Exception as exc:
                await self._retry_or_dead_letter(entry, delivery, exc)
                return
            await self._settle(entry, msg.ack(), "ack")
            return

    async def _await_recovery(self, entry: _InFlight, attempt: int) -> bool:
        """Back off while the broker recovers; False when the message went back."""
        await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
        if self._host.closing:
            return False  # `stop` gives it back
        if attempt >= self.OUTAGE_RETRY_LIMIT:
            await self._settle(entry, entry.msg.nak(), "nak")
            return False
        return True

    async def _retry_or_dead_letter(
        self, entry: _InFlight, delivery: Delivery, exc: Exception
    ) -> None:
        limit = self._host.settings.delivery_limit
        if delivery.delivery_count >= limit:
            await self._dead_letter(entry, f"delivery limit {limit} reached: {exc!r}")
            return
        self._host.count_redelivery(self.topic)
        log.warning(
            "handler failed, redelivering",
            exc_info=exc,
            extra={
                "topic": self.topic,
                "message_id": delivery.message_id,
                "delivery_count": delivery.delivery_count,
                "reason": repr(exc),
            },
        )
        delay = self._host.settings.redelivery_delay_seconds * delivery.delivery_count
        await self._settle(entry, entry.msg.nak(delay=delay), "nak")

    async def _dead_letter(self, entry: _InFlight, reason: str) -> None:
        attempt = 0
        while not await self._host.dead_letter(self.topic, entry.msg, reason):
            # The copy was not acknowledged: keep the message (reporting progress) and
            # try again, rather than hand JetStream a last delivery it would give up.
            attempt += 1
            if not await self._await_recovery(entry, attempt):
                return
        entry.settled = True

    async def _settle(self, entry: _InFlight, operation: Awaitable[None], kind: str) -> None:
        entry.settled = True
        try:
            async with asyncio.timeout(self._host.settings.publish_timeout_seconds):
                await operation
        except (*_FetchErrors, TimeoutError) as exc:
            log.warning(
                "settling a delivery failed, the broker will redeliver it",
                extra={"topic": self.topic, "operation": kind, "error": repr(exc)},
            )
