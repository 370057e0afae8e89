"""PostgreSQL's change feed: committed saga writes announced with NOTIFY, heard with LISTEN.

The writer announces every saga a transaction changed with `pg_notify` on
`CHANNEL`, inside that transaction, so PostgreSQL delivers the announcement
once it commits and never for a rolled-back one. A payload is a JSON array of
`[facade, request_id]` pairs, split so that each stays under PostgreSQL's
8000-byte limit: a batch of 256 writes is one or two notifications.

Each replica's `PgChangeFeed` LISTENs on a connection of its own (asyncpg,
outside SQLAlchemy's pool) and hands each announced saga to its subscribers
on the event loop. A connection that drops (a server restart,
`pg_terminate_backend`, a network fault caught by the periodic ping) is
reopened with exponential backoff; meanwhile `live` is False, and subscribers
hear of the gap when it drops and when it is back, since announcements made
in between are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, Final

from orchestrator.store._subscribers import Subscribers
from orchestrator.store.base import ChangeListener, GapListener

__all__ = [
    "APPLICATION_NAME",
    "CHANNEL",
    "MAX_PAYLOAD_BYTES",
    "PgChangeFeed",
    "notification_payloads",
    "parse_payload",
]

log = logging.getLogger("orchestrator.store.sql")

CHANNEL: Final = "orchestrator_saga_changes"
"""The NOTIFY channel every replica announces saga writes on, and listens to."""
MAX_PAYLOAD_BYTES: Final = 7999
"""PostgreSQL refuses a NOTIFY payload of 8000 bytes or more."""
APPLICATION_NAME: Final = "orchestrator-listen"
"""The listening connection's `application_name`, as `pg_stat_activity` shows it."""
RECONNECT_MIN_SECONDS: Final = 0.1
"""The first pause before reconnecting; it doubles with each failed attempt ..."""
RECONNECT_MAX_SECONDS: Final = 5.0
"""... up to this."""
PING_SECONDS: Final = 5.0
"""How often the listening connection is checked with a query, and how long that may take: a
half-open connection tells nothing otherwise."""
CONNECT_TIMEOUT_SECONDS: Final = 10.0
"""How long one connection attempt may take."""


def notification_payloads(keys: Iterable[tuple[str, str]]) -> list[str]:
    """The NOTIFY payloads announcing the sagas `keys`: JSON arrays of `[facade, request_id]`,
    each at most `MAX_PAYLOAD_BYTES` in UTF-8 (a facade name and a request id are far shorter)."""
    payloads: list[str] = []
    entries: list[str] = []
    size = 2  # the brackets
    for facade, request_id in keys:
        entry = json.dumps([facade, request_id], ensure_ascii=False, separators=(",", ":"))
        entry_size = len(entry.encode()) + 1  # and its comma
        if entries and size + entry_size > MAX_PAYLOAD_BYTES:
            payloads.append(f"[{','.join(entries)}]")
            entries, size = [], 2
        entries.append(entry)
        size += entry_size
    if entries:
        payloads.append(f"[{','.join(entries)}]")
    return payloads


def parse_payload(payload: str) -> list[tuple[str, str]]:
    """The sagas a payload of `notification_payloads` announces; ValueError when it is not one."""
    value: Any = json.loads(payload)
    if not isinstance(value, list):
        raise ValueError("not a JSON array")
    keys = []
    for entry in value:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not all(isinstance(part, str) for part in entry)
        ):
            raise ValueError(f"not a [facade, request_id] pair: {entry!r}")
        keys.append((entry[0], entry[1]))
    return keys


class PgChangeFeed:
    """LISTENs to `CHANNEL` on a connection of its own, reconnecting while it runs."""

    def __init__(
        self,
        dsn: str,
        *,
        reconnect_min: float = RECONNECT_MIN_SECONDS,
        reconnect_max: float = RECONNECT_MAX_SECONDS,
        ping_interval: float = PING_SECONDS,
    ) -> None:
        """`dsn`: a plain `postgresql://` URL with its password (never logged)."""
        self._dsn = dsn
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        self._ping_interval = ping_interval
        self._subscribers = Subscribers()
        self._task: asyncio.Task[None] | None = None
        self._live = asyncio.Event()
        self.live = False
        """True while LISTEN is in effect: every committed write is being heard."""
        self.backend_pid: int | None = None
        """The listening connection's server process, while live (`pg_terminate_backend`)."""
        self.connections = 0
        """Listening connections opened so far: 1 plus the reconnections."""
        self.announcements = 0
        """Sagas announced to this feed so far."""
        self.writer_pid: int | None = None
        """The server process of this store's writing connection, while it holds one: what
        it announces is this store's own (see `subscribe`'s `others_only`). Set by the
        writer; unset before its connection is given up, so a process number PostgreSQL
        reuses for another connection is never taken for this store's."""

    def subscribe(
        self, changed: ChangeListener, gap: GapListener | None, *, others_only: bool = False
    ) -> Callable[[], None]:
        """Call `changed(facade, request_id)` for every announced saga (with `others_only`,
        those not announced by `writer_pid`) and `gap()` when the feed drops or comes back;
        returns a function that unsubscribes."""
        return self._subscribers.subscribe(changed, gap, others_only=others_only)

    def start(self) -> None:
        """Start listening in the background; the first connection is made there, so a
        database that is briefly unreachable delays nothing but the feed."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="saga-store-listen")

    async def close(self) -> None:
        """Stop listening and close the connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_live(self) -> None:
        """Return once the feed is live (bound the wait with `asyncio.timeout`)."""
        await self._live.wait()

    async def _run(self) -> None:
        import asyncpg  # type: ignore[import-untyped]  # the `postgres` extra

        delay = self._reconnect_min
        failures = 0
        while True:
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=CONNECT_TIMEOUT_SECONDS,
                    server_settings={"application_name": APPLICATION_NAME},
                )
            except Exception as exc:  # whatever it is, the feed retries: it must outlive it
                failures += 1
                if failures == 1:
                    log.warning(
                        "saga change feed: cannot connect (%s); retrying", type(exc).__name__
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._reconnect_max)
                continue
            try:
                await self._listen(conn)
                failures = 0
                delay = self._reconnect_min
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("saga change feed lost (%s); reconnecting", type(exc).__name__)
            except Exception:
                log.exception("saga change feed failed; reconnecting")
            finally:
                if self.live:
                    self.live = False
                    self._live.clear()
                    self.backend_pid = None
                    self._gapped()
                conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._reconnect_max)

    async def _listen(self, conn: Any) -> None:
        """LISTEN on `conn` until it is lost (returns) or fails a ping (raises)."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(CHANNEL, self._on_notification)
        self.live = True
        self._live.set()
        self.backend_pid = conn.get_server_pid()
        self.connections += 1
        if self.connections > 1:
            log.info("saga change feed reconnected")
        self._gapped()  # what was written before LISTEN took effect went unheard
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._ping_interval):
                    await lost.wait()
            if not lost.is_set():
                async with asyncio.timeout(self._ping_interval):
                    await conn.execute("SELECT 1")

    def _on_notification(self, _conn: Any, pid: int, _channel: str, payload: str) -> None:
        try:
            keys = parse_payload(payload)
        except ValueError as exc:
            # Not ours (someone else's NOTIFY on the channel): whatever it meant, re-read.
            log.warning("saga change feed: unreadable payload (%s)", exc)
            self._gapped()
            return
        self.announcements += len(keys)
        own = pid == self.writer_pid
        for facade, request_id in keys:
            self._subscribers.changed(facade, request_id, own=own)

    def _gapped(self) -> None:
        self._subscribers.gapped()
