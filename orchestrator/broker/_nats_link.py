"""The connection to NATS: made within `connect_timeout_seconds`, watched, never logged raw.

nats-py reconnects by itself, forever, every `reconnect_interval_seconds`;
its subscriptions come back with the connection. The link reports the
connection's state (`on_state(True)` once connected or reconnected, `False` on
a disconnect) and pings the server every `heartbeat_seconds`: two pings
without an answer drop a silent connection and reconnect it.

Credentials come only from the URL (`nats://user:password@host`,
`nats://token@host`); every text this module logs or raises goes through
`scrub`, which masks them however an error quotes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from urllib.parse import quote, unquote, urlsplit

import nats
import nats.errors
import nats.js
from nats.aio.client import Client

from orchestrator.config import BrokerSettings
from orchestrator.errors import BrokerUnavailable

__all__ = ["NatsLink"]

log = logging.getLogger("orchestrator.broker.nats")

_AUTHORIZATION_HINTS = ("authorization violation", "authentication", "user credentials")


class _LoginRefused(Exception):
    """The server refused the credentials: retrying cannot help."""


class NatsLink:
    """One NATS connection and its JetStream context."""

    def __init__(self, settings: BrokerSettings, on_state: Callable[[bool], None]) -> None:
        self._settings = settings
        self._on_state = on_state
        self._client: Client | None = None
        self._js: nats.js.JetStreamContext | None = None
        self._closing = False
        self._secrets = _secrets_of(settings.url.get_secret_value())

    @property
    def client(self) -> Client:
        """The connected client; BrokerUnavailable before `connect` or after `close`."""
        if self._client is None:
            raise BrokerUnavailable("the broker is not started")
        return self._client

    @property
    def js(self) -> nats.js.JetStreamContext:
        """The JetStream context of the connection."""
        if self._js is None:
            raise BrokerUnavailable("the broker is not started")
        return self._js

    @property
    def connected(self) -> bool:
        """True while the connection is up (not reconnecting, not closed)."""
        return self._client is not None and self._client.is_connected

    def scrub(self, text: str) -> str:
        """`text` with the URL's password or token masked, however it is quoted."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def describe(self, exc: BaseException) -> str:
        """An error as `Type: message`, scrubbed, for logs and BrokerUnavailable."""
        message = str(exc).strip()
        text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        return self.scrub(text)

    async def connect(self) -> None:
        """Connect within `connect_timeout_seconds`, retrying; raises BrokerUnavailable when
        the server cannot be reached in time or refuses the login."""
        settings = self._settings
        self._closing = False
        client = Client()
        failures: list[str] = []

        async def on_error(exc: Exception) -> None:
            await self._on_error(exc, client, failures)

        try:
            async with asyncio.timeout(settings.connect_timeout_seconds):
                await client.connect(
                    servers=[settings.url.get_secret_value()],
                    name="orchestrator",
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=settings.reconnect_interval_seconds,  # type: ignore[arg-type]
                    ping_interval=settings.heartbeat_seconds,
                    max_outstanding_pings=2,
                    error_cb=on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
        except _LoginRefused as refused:
            await self._abandon(client)
            raise BrokerUnavailable(
                f"broker {settings.safe_url} refused the login: {refused}"
            ) from None
        except TimeoutError:
            await self._abandon(client)
            last = failures[-1] if failures else "no answer"
            raise BrokerUnavailable(
                f"broker {settings.safe_url} unreachable for "
                f"{settings.connect_timeout_seconds}s: {last}"
            ) from None
        except (OSError, nats.errors.Error) as exc:
            await self._abandon(client)
            raise BrokerUnavailable(
                f"broker {settings.safe_url} unreachable: {self.describe(exc)}"
            ) from None
        except asyncio.CancelledError:
            await self._abandon(client)
            raise
        self._client = client
        self._js = client.jetstream(timeout=settings.publish_timeout_seconds)
        try:
            async with asyncio.timeout(settings.publish_timeout_seconds):
                await self._js.account_info()
        except (TimeoutError, nats.errors.Error) as exc:
            await self.close()
            raise BrokerUnavailable(
                f"broker {settings.safe_url} offers no JetStream: {self.describe(exc)}"
            ) from None
        log.info("connected to broker", extra={"url": settings.safe_url})
        self._on_state(True)

    async def flush(self) -> None:
        """Wait, briefly, until everything written (acks included) reached the server."""
        if self._client is not None and self._client.is_connected:
            with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
                await self._client.flush(timeout=2)

    async def close(self) -> None:
        """Flush and close the connection (within a few seconds, whatever the server does)."""
        self._closing = True
        client, self._client, self._js = self._client, None, None
        if client is not None:
            await self._abandon(client)
        self._on_state(False)

    async def _abandon(self, client: Client) -> None:
        task = asyncio.current_task()
        with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
            try:
                async with asyncio.timeout(5):
                    await client.close()
            except asyncio.CancelledError:
                # After the server died, nats-py may await the close waiter of a
                # socket its own (cancelled) reconnect attempt opened: that raises
                # CancelledError though nobody cancelled us. Only a real
                # cancellation of this task goes on.
                if task is not None and task.cancelling():
                    raise

    async def _on_error(self, exc: Exception, client: Client, failures: list[str]) -> None:
        described = self.describe(exc)
        if self._client is None and not self._closing:
            # Still making the first connection: nats-py calls this between its attempts.
            if any(hint in described.lower() for hint in _AUTHORIZATION_HINTS):
                raise _LoginRefused(described)
            failures.append(described)
            log.warning(
                "broker unreachable, retrying",
                extra={
                    "url": self._settings.safe_url,
                    "attempt": len(failures),
                    "error": described,
                },
            )
            return
        log.warning(
            "broker connection error", extra={"url": self._settings.safe_url, "error": described}
        )

    async def _on_disconnected(self) -> None:
        if self._closing or self._client is None:
            return
        log.warning("broker connection lost, reconnecting", extra={"url": self._settings.safe_url})
        self._on_state(False)

    async def _on_reconnected(self) -> None:
        if self._closing:
            return
        log.info("broker connection restored", extra={"url": self._settings.safe_url})
        self._on_state(True)


def _secrets_of(url: str) -> tuple[str, ...]:
    """The password or token of `url`, as written and decoded, longest first."""
    parts = urlsplit(url)
    found = {parts.password} if parts.password else {parts.username} if parts.username else set()
    found.discard(None)
    variants = set()
    for secret in found:
        assert secret is not None
        variants |= {secret, unquote(secret), quote(unquote(secret), safe="")}
    return tuple(sorted((v for v in variants if v), key=len, reverse=True))
