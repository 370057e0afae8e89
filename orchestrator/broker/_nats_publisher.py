"""Publishing to JetStream: a `PubAck` for every message, within its deadline, once.

`publish` returns only once the stream acknowledged the message (it is on
disk); it raises UnroutableError when no stream takes the subject and
BrokerUnavailable for anything else that kept the acknowledgement away.

A message id the stream's duplicate window remembers is acknowledged as a
duplicate and not stored again. That is the point while the first copy still
waits in the stream (a publish retried after a lost acknowledgement); but once
the first copy was consumed, a publish under the same id is a new intent (an
operator's replay, a rollback sent again) and is stored under a fresh
`Nats-Msg-Id`, its own id kept in `MESSAGE_ID_HEADER`.

Refusals for lack of resources (JetStream's storage is full) block publishing
for `reconnect_interval_seconds`: `on_blocked(reason)` is told, and publishes
fail at once naming the reason until then (`on_blocked(None)`). JetStream
sends no word when room is made, so the next publish after that finds out.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping

import nats.errors
import nats.js.errors
from nats.js.api import PubAck

from orchestrator.broker._nats_link import NatsLink
from orchestrator.broker._nats_messages import MESSAGE_ID_HEADER, MSG_ID, one_line
from orchestrator.broker._nats_names import NatsNames
from orchestrator.broker.base import UnroutableError
from orchestrator.config import BrokerSettings
from orchestrator.errors import BrokerUnavailable

__all__ = ["NatsPublisher"]

_NO_ROOM = frozenset({10023, 10028, 10047})
"""JetStream's error codes for a store with no room: insufficient resources, stream and
server limits, a failed store write."""


class NatsPublisher:
    """Publishes to the subjects of `names`' stream through `link`."""

    def __init__(
        self,
        link: NatsLink,
        settings: BrokerSettings,
        names: NatsNames,
        on_blocked: Callable[[str | None], None],
    ) -> None:
        self._link = link
        self._settings = settings
        self._names = names
        self._on_blocked = on_blocked
        self._blocked: str | None = None
        self._unblock: asyncio.TimerHandle | None = None

    @property
    def blocked(self) -> str | None:
        """Why publishing is refused for now, or None."""
        return self._blocked

    def reset(self) -> None:
        """Forget a block (the broker closed)."""
        if self._unblock is not None:
            self._unblock.cancel()
        self._unblock = None
        self._blocked = None

    async def publish(
        self,
        subject: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, str] | None,
        deadline: float,
        again_once_consumed: bool = True,
    ) -> None:
        """Publish to `subject` and wait for its `PubAck` until `deadline` (loop time).

        `again_once_consumed=False` leaves a duplicate a duplicate even when its first copy
        was consumed (a dead letter is kept once, collected or not).
        """
        fields = {key: one_line(value) for key, value in (headers or {}).items()}
        if message_id:
            fields[MSG_ID] = message_id
        ack = await self._publish_once(subject, body, fields, message_id, deadline)
        if not (ack.duplicate and message_id and again_once_consumed):
            return
        if await self._still_stored(ack, deadline):
            return
        # The first copy was consumed: this publish is a new one, under an id of its own.
        fields[MSG_ID] = f"{message_id}~{uuid.uuid4().hex}"
        fields[MESSAGE_ID_HEADER] = message_id
        await self._publish_once(subject, body, fields, message_id, deadline)

    async def _publish_once(
        self,
        subject: str,
        body: bytes,
        fields: dict[str, str],
        message_id: str,
        deadline: float,
    ) -> PubAck:
        loop = asyncio.get_running_loop()
        timeout = deadline - loop.time()
        if timeout <= 0:
            raise BrokerUnavailable(f"no time left to publish message {message_id}")
        if self._blocked is not None:
            raise BrokerUnavailable(self._blocked_message(message_id))
        js = self._link.js
        try:
            # Our own timer too: nats-py's request timer does not cover a full write buffer.
            async with asyncio.timeout(timeout):
                return await js.publish(
                    subject, body, timeout=timeout, stream=self._names.stream, headers=dict(fields)
                )
        except nats.js.errors.NoStreamResponseError as exc:
            raise UnroutableError(f"no stream takes subject {subject!r}") from exc
        except nats.js.errors.APIError as exc:
            if exc.err_code in _NO_ROOM:
                self._block(exc.description or "no room")
                raise BrokerUnavailable(self._blocked_message(message_id)) from exc
            raise BrokerUnavailable(
                f"broker refused message {message_id}: {self._link.describe(exc)}"
            ) from exc
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"no PubAck for message {message_id} within {timeout:.3g}s"
            ) from exc
        except (nats.errors.Error, OSError) as exc:
            raise BrokerUnavailable(
                f"cannot publish message {message_id}: {self._link.describe(exc)}"
            ) from exc

    async def _still_stored(self, ack: PubAck, deadline: float) -> bool:
        """True when the message `ack` names is still in the stream (not consumed yet)."""
        timeout = deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(max(timeout, 0.001)):
                await self._link.js.get_msg(self._names.stream, ack.seq)
        except nats.js.errors.NotFoundError:
            return False
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise BrokerUnavailable(
                f"cannot tell whether a duplicate was consumed: {self._link.describe(exc)}"
            ) from exc
        return True

    def _block(self, reason: str) -> None:
        first = self._blocked is None
        self._blocked = f"JetStream: {reason}"
        if self._unblock is not None:
            self._unblock.cancel()
        self._unblock = asyncio.get_running_loop().call_later(
            self._settings.reconnect_interval_seconds, self._lift
        )
        if first:
            self._on_blocked(self._blocked)

    def _lift(self) -> None:
        self._unblock = None
        if self._blocked is not None:
            self._blocked = None
            self._on_blocked(None)

    def _blocked_message(self, message_id: str) -> str:
        return (
            f"cannot publish message {message_id}: broker {self._settings.safe_url} "
            f"refuses publishes ({self._blocked})"
        )
