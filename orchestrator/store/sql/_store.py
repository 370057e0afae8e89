"""The saga store on SQL: SQLite or PostgreSQL (asyncpg), with group commit.

Every saga writes its log several times (its begin, each step's end with the
next one's start, its end), so the store sits on the hot path of every
request. Writes are queued to one writer, which applies everything queued
since its previous transaction (up to `max_batch`) in one transaction and
resolves the callers only after the commit: each write still returns once
durable, but the sagas in flight share one commit instead of paying for it one
by one. A saga's ops keep their queue order; ops of different sagas may be
regrouped.

The store itself speaks to no database in particular: a `Backend`
(`_writer`) gives it its engine (reads, migrations), its `Writer` and its
change feed, one per database:

- SQLite (`_sqlite`): the writer is its own sqlite3 connection, used on the
  event loop, commits paced to one per `SQLITE_COMMIT_INTERVAL` under load,
  checkpoints off the loop. Claims of stalled sagas go through it too, so no
  other connection of the process ever holds the write lock. Point reads use
  that connection too.
- PostgreSQL (`_postgres_writer`): the writer is a task, and a batch is a few
  set-based statements (`_postgres`), run on asyncpg itself under a connection
  of SQLAlchemy's pool; point reads go to an asyncpg pool of their own. Each
  transaction that changed sagas also NOTIFYs their keys, and each store
  LISTENs on a connection of its own (`_listen`): replicas sharing the
  database hear of each other's writes as they commit (`subscribe_changes`,
  `announces_changes`). On SQLite the processes writing the file tell each
  other with Unix datagrams instead (`_host_feed`).

Operators' writes (`act`, keeping and settling dead letters) go through the
same writer, so on SQLite too one connection writes: rare, they are ops of
their own, each applied by plain statements in the batch's transaction
(`_operator`), and the engine's writes around them batch as before. Their
reads, like `list_sagas`, go through SQLAlchemy.

When a batch's transaction fails, nothing of it was applied. If a statement
failed, the batch is split in halves and each retried, down to the bad op
alone, so one bad op (a too-long id, a deadlock victim) fails only its
caller. If the database itself failed (no connection, SQLite's write lock not
had within `LOCK_TIMEOUT_SECONDS`, connection lost) or the COMMIT did (it may
have committed), every op of the batch fails with that error, once: the
callers' retries decide (`_writer`).

URLs: ``sqlite+aiosqlite:///path/to/file.db`` and
``postgresql+asyncpg://user@host:port/db`` (``sqlite://`` and ``postgresql://``
get those drivers). An in-memory SQLite database is refused (the writer's
connection and the readers' would each see a database of their own); use
`InMemorySagaStore` (``memory://``) instead. SQLite runs in WAL mode with
synchronous=NORMAL: a commit survives the process crashing, not the machine
losing power.

Timestamps come from this process's clock (UTC), so replicas sharing a
PostgreSQL database need synchronized clocks, with leases and deadlines well
above any skew.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import bindparam, func, select, tuple_
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import ColumnElement

from orchestrator.errors import StoreUnavailable
from orchestrator.store.base import MAX_PAGE_SIZE, ChangeListener, GapListener, SagaStore
from orchestrator.store.changes import Change
from orchestrator.store.operator import (
    ActionRecord,
    DeadLetterPage,
    DeadLetterRecord,
    DeadLetterState,
    NewDeadLetter,
    OperatorChange,
)
from orchestrator.store.records import (
    NewSaga,
    Position,
    SagaPage,
    SagaRecord,
    SagaState,
    Stalled,
)
from orchestrator.store.sql._host_feed import HostChangeFeed, changed_sagas
from orchestrator.store.sql._listen import PgChangeFeed
from orchestrator.store.sql._migrate import upgrade as upgrade_schema
from orchestrator.store.sql._operator import (
    action_records,
    actions_query,
    decode_letter_token,
    encode_letter_token,
    letter_records,
    letters_query,
)
from orchestrator.store.sql._ops import (
    ActOp,
    AddDeadLetterOp,
    ApplyOp,
    BeginOp,
    ClaimOp,
    HeartbeatOp,
    Op,
    SettleDeadLetterOp,
    UnsettleDeadLetterOp,
)
from orchestrator.store.sql._postgres_writer import PostgresBackend, PostgresWriter
from orchestrator.store.sql._records import decode_token, encode_token, records, records_query
from orchestrator.store.sql._schema import dead_letters, sagas
from orchestrator.store.sql._sqlite import SqliteBackend
from orchestrator.store.sql._writer import Backend, Writer, WriterOptions, WriterStats, brief

__all__ = ["SqlSagaStore"]

log = logging.getLogger("orchestrator.store.sql")

MAX_BATCH: Final = 256
"""Most writes applied in one transaction: bounds a transaction's size and the wait behind it."""


def _now() -> datetime:
    return datetime.now(UTC)


def _backend(raw: str) -> Backend:
    """The backend for a store URL; a bare `sqlite://` or `postgresql://` gets our driver."""
    url = make_url(raw)
    name = url.get_backend_name()
    driver = url.get_driver_name() if "+" in url.drivername else ""
    if name == "sqlite" and driver in ("", "aiosqlite"):
        return SqliteBackend(url)
    if name == "postgresql" and driver in ("", "asyncpg"):
        return PostgresBackend(url)
    raise ValueError(
        f"unsupported saga store URL {url.render_as_string(hide_password=True)!r}: "
        "use sqlite+aiosqlite:///path.db or postgresql+asyncpg://user@host:port/db"
    )


class SqlSagaStore(SagaStore):
    """Sagas in SQLite or PostgreSQL, written through a group-commit writer."""

    def __init__(
        self,
        url: str,
        *,
        max_batch: int = MAX_BATCH,
        commit_interval: float | None = None,
        announce_changes: bool = True,
    ) -> None:
        """`max_batch` caps the writes per transaction (1 turns group commit off);
        `commit_interval` paces commits, at most one per so many seconds (None: the
        backend's default, `SQLITE_COMMIT_INTERVAL` on SQLite and none on PostgreSQL).
        `announce_changes`: announce every saga write and hear every replica's (NOTIFY
        and LISTEN on PostgreSQL, datagrams between the processes on a SQLite file);
        off, this store neither announces nor hears."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if commit_interval is not None and commit_interval < 0:
            raise ValueError("commit_interval must not be negative")
        self._backend = _backend(url)
        self._commit_interval = (
            self._backend.commit_interval if commit_interval is None else commit_interval
        )
        self._max_batch = max_batch
        self._engine = self._backend.engine()
        self._writer: Writer | None = None
        self._closing = False
        self.stats = WriterStats()
        self._actions_query = actions_query()
        self._letter_query = letters_query(dead_letters.c.id == bindparam("b_id"))
        self.change_feed: PgChangeFeed | HostChangeFeed | None = (
            self._backend.change_feed() if announce_changes else None
        )
        """The change feed: LISTEN/NOTIFY on PostgreSQL, datagrams on SQLite; None with
        `announce_changes` off."""

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._backend.url.render_as_string(hide_password=True)

    # --- lifecycle ---

    async def start(self) -> None:
        """Create or upgrade the schema (its migrations), and start the writer."""
        if self._writer is not None:
            return
        try:
            revision = await upgrade_schema(self._engine)
        except (DBAPIError, OSError, TimeoutError) as exc:
            # No connection, no such database, a file that cannot be opened: the URL's
            # fault or the database's, never a caller's.
            raise StoreUnavailable(f"cannot open the saga store {self.url}: {brief(exc)}") from exc
        log.info("saga store schema at revision %s", revision, extra={"store": self.url})
        self._closing = False
        writer = self._backend.writer(
            self._engine,
            WriterOptions(
                max_batch=self._max_batch,
                commit_interval=self._commit_interval,
                stats=self.stats,
                announce=self.change_feed is not None,
            ),
        )
        await writer.open()
        self._writer = writer
        feed = self.change_feed
        if isinstance(feed, HostChangeFeed):
            writer.written = lambda written: feed.announce(changed_sagas(written.outcomes))
        elif isinstance(feed, PgChangeFeed) and isinstance(writer, PostgresWriter):
            writer.connected = lambda pid: setattr(feed, "writer_pid", pid)
        if feed is not None:
            feed.start()

    @property
    def announces_changes(self) -> bool:
        """True while the change feed is live: every replica's committed writes reach the
        subscribers at once (on SQLite: every process's on this host)."""
        return self.change_feed is not None and self.change_feed.live

    def subscribe_changes(
        self,
        changed: ChangeListener,
        gap: GapListener | None = None,
        *,
        others_only: bool = False,
    ) -> Callable[[], None]:
        """Hear of every replica's committed saga writes (see `SagaStore.subscribe_changes`;
        with `others_only`, every other replica's and process's); with `announce_changes`
        off, nothing is ever called."""
        if self.change_feed is None:
            return super().subscribe_changes(changed, gap)
        return self.change_feed.subscribe(changed, gap, others_only=others_only)

    async def close(self) -> None:
        """Apply every queued write, stop the writer and the listener, and disconnect."""
        if self.change_feed is not None:
            await self.change_feed.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            self._closing = True
            await writer.close()
        await self._engine.dispose()

    # --- writes, through the writer ---

    def _submit(self, op: Op) -> asyncio.Future[Any]:
        if self._closing or self._writer is None:
            raise RuntimeError("the saga store is not running (start() it; is it closed?)")
        self._writer.submit(op)
        return op.future

    def _future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def begin(self, saga: NewSaga) -> SagaRecord | None:
        """Record a new RUNNING saga with its first step, unless one exists under its key:
        then return that one."""
        if await self._submit(BeginOp(_now(), self._future(), saga)):
            return None
        # Committed before our INSERT found it, and sagas are never deleted: it is there.
        existing = await self.get(saga.facade, saga.request_id)
        if existing is None:
            raise RuntimeError(
                f"saga {saga.facade}/{saga.request_id} was there to conflict with, then gone"
            )
        return existing

    async def apply(self, facade: str, request_id: str, change: Change) -> bool:
        """Apply `change` if the saga stands where it expects; whether it was applied."""
        applied: bool = await self._submit(
            ApplyOp(_now(), self._future(), facade, request_id, change)
        )
        return applied

    async def heartbeat(self, owner: str) -> None:
        """Record that replica `owner` is alive now."""
        await self._submit(HeartbeatOp(_now(), self._future(), owner))

    async def claim_stalled(
        self, owner: str, *, stale_after: float, hold_for: float
    ) -> list[Stalled]:
        """Take over stalled sagas (see `SagaStore.claim_stalled`), in the writer's
        transaction: each goes to exactly one claimer."""
        now = _now()
        claimed: list[tuple[tuple[str, str], bool]] = await self._submit(
            ClaimOp(
                now,
                self._future(),
                owner,
                stale_before=now - timedelta(seconds=stale_after),
                hold_until=now + timedelta(seconds=hold_for),
            )
        )
        stalled = []
        for (facade, request_id), expired in claimed:
            saga = await self.get(facade, request_id)
            if saga is not None:
                stalled.append(Stalled(saga, expired=expired))
        return stalled

    # --- operators: their writes go through the writer too, one op each ---

    async def act(
        self,
        facade: str,
        request_id: str,
        change: Change | OperatorChange,
        action: ActionRecord,
    ) -> bool:
        """Apply an operator's move and record `action` on the saga, in one transaction;
        whether it was applied (refused, neither is written)."""
        applied: bool = await self._submit(
            ActOp(_now(), self._future(), facade, request_id, change, action)
        )
        return applied

    async def add_dead_letter(self, letter: NewDeadLetter) -> bool:
        """Keep a dead letter, WAITING; False (nothing changes) when its id is kept already."""
        added: bool = await self._submit(AddDeadLetterOp(_now(), self._future(), letter))
        return added

    async def settle_dead_letter(
        self, letter_id: str, state: DeadLetterState, action: ActionRecord
    ) -> bool:
        """A WAITING dead letter to `state`, once, with `action` on its saga's record when the
        saga exists, in one transaction; False (nothing written) when it is not WAITING."""
        if state == DeadLetterState.WAITING:
            raise ValueError("a dead letter is settled as REPLAYED or DISCARDED")
        settled: bool = await self._submit(
            SettleDeadLetterOp(_now(), self._future(), letter_id, state, action)
        )
        return settled

    async def unsettle_dead_letter(self, letter_id: str) -> bool:
        """A REPLAYED dead letter WAITING again, its `replay` action off its saga's record, in
        one transaction; False when it is not REPLAYED."""
        unsettled: bool = await self._submit(
            UnsettleDeadLetterOp(_now(), self._future(), letter_id)
        )
        return unsettled

    # --- reads ---

    async def get(self, facade: str, request_id: str) -> SagaRecord | None:
        """The saga with its steps in order, or None."""
        return await self._running().get(facade, request_id)

    async def position(self, facade: str, request_id: str) -> Position | None:
        """Where the saga stands, or None: a lighter read than `get`."""
        return await self._running().position(facade, request_id)

    def _running(self) -> Writer:
        if self._writer is None:
            raise RuntimeError("the saga store is not running (start() it; is it closed?)")
        return self._writer

    async def list_sagas(
        self,
        *,
        facade: str = "",
        state: SagaState | None = None,
        page_size: int = 50,
        page_token: str = "",
        request_id_prefix: str = "",
    ) -> SagaPage:
        """Newest first, with steps; `page_size` is clamped to 1..500; a bad token: ValueError."""
        page_size = max(1, min(page_size, MAX_PAGE_SIZE))
        criteria = _saga_filter(facade, request_id_prefix)
        if state is not None:
            criteria.append(sagas.c.state == str(state))
        if page_token:
            after = decode_token(page_token)
            position = tuple_(sagas.c.created_at, sagas.c.facade, sagas.c.request_id)
            criteria.append(position < after)
        # One more than the page says whether there is a next one.
        query = records_query(*criteria, limit=page_size + 1)
        async with self._engine.connect() as conn:
            found = records(await conn.execute(query))
        page = found[:page_size]
        token = encode_token(page[-1]) if len(found) > page_size else ""
        return SagaPage(sagas=page, next_page_token=token)

    async def count_sagas(
        self, *, facade: str = "", request_id_prefix: str = ""
    ) -> dict[SagaState, int]:
        """How many sagas are in each state (one grouped count, on the listing index)."""
        query = (
            select(sagas.c.state, func.count())
            .where(*_saga_filter(facade, request_id_prefix))
            .group_by(sagas.c.state)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {SagaState(state): int(count) for state, count in rows}

    async def actions(self, facade: str, request_id: str) -> list[ActionRecord]:
        """What operators did to the saga, oldest first."""
        async with self._engine.connect() as conn:
            result = await conn.execute(self._actions_query, {"f": facade, "r": request_id})
            return action_records(result)

    async def get_dead_letter(self, letter_id: str) -> DeadLetterRecord | None:
        """The dead letter, or None."""
        async with self._engine.connect() as conn:
            found = letter_records(await conn.execute(self._letter_query, {"b_id": letter_id}))
        return found[0] if found else None

    async def list_dead_letters(
        self,
        *,
        topic: str = "",
        facade: str = "",
        state: DeadLetterState = DeadLetterState.WAITING,
        page_size: int = 50,
        page_token: str = "",
    ) -> DeadLetterPage:
        """Dead letters in `state`, newest first, filtered by topic and facade;
        `page_size` is clamped to 1..500; a bad token: ValueError."""
        page_size = max(1, min(page_size, MAX_PAGE_SIZE))
        criteria: list[ColumnElement[bool]] = [dead_letters.c.state == str(state)]
        if topic:
            criteria.append(dead_letters.c.topic == topic)
        if facade:
            criteria.append(dead_letters.c.facade == facade)
        if page_token:
            after = decode_letter_token(page_token)
            criteria.append(tuple_(dead_letters.c.dead_lettered_at, dead_letters.c.id) < after)
        # One more than the page says whether there is a next one.
        query = letters_query(*criteria, limit=page_size + 1)
        async with self._engine.connect() as conn:
            found = letter_records(await conn.execute(query))
        page = found[:page_size]
        token = encode_letter_token(page[-1]) if len(found) > page_size else ""
        return DeadLetterPage(letters=tuple(page), next_page_token=token)

    async def __aenter__(self) -> SqlSagaStore:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _saga_filter(facade: str, request_id_prefix: str) -> list[ColumnElement[bool]]:
    """The criteria of a listing by facade and request id prefix. The prefix is compared
    as a substring, exactly: LIKE would be case-insensitive on SQLite and treat `%`/`_`."""
    criteria: list[ColumnElement[bool]] = []
    if facade:
        criteria.append(sagas.c.facade == facade)
    if request_id_prefix:
        start = func.substr(sagas.c.request_id, 1, len(request_id_prefix))
        criteria.append(start == request_id_prefix)
    return criteria
