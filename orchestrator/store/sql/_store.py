"""The saga store on SQL: SQLite or PostgreSQL (asyncpg), with group commit.

Every saga writes its log several times (its begin, each step's end with the
next one's start, its end), so the store sits on the hot path of every
request. Writes are queued to one writer, which applies everything queued
since its previous transaction (up to `max_batch`) in one transaction and
resolves the callers only after the commit: each write still returns once
durable, but the sagas in flight share one commit instead of paying for it one
by one. A saga's ops keep their queue order; ops of different sagas may be
regrouped.

- On SQLite the writer is `SqliteWriter` (`_sqlite`): its own sqlite3
  connection, used on the event loop, commits paced to one per
  `SQLITE_COMMIT_INTERVAL` under load, checkpoints off the loop. Claims of
  stalled sagas go through it too, so no other connection of the process ever
  holds the write lock. Point reads use that connection too.
- On PostgreSQL it is a task, and a batch is a few set-based statements
  (`_postgres`). Each transaction that changed sagas also NOTIFYs their keys,
  and each store LISTENs on a connection of its own (`_listen`): replicas
  sharing the database hear of each other's writes as they commit
  (`subscribe_changes`, `announces_changes`).

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
callers' retries decide.

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
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import bindparam, event, func, select, text, tuple_
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.elements import ColumnElement

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
    BatchFailed,
    BeginOp,
    ClaimOp,
    HeartbeatOp,
    Op,
    SettleDeadLetterOp,
    UnsettleDeadLetterOp,
)
from orchestrator.store.sql._postgres import apply_batch
from orchestrator.store.sql._records import (
    POSITION,
    decode_token,
    encode_token,
    position,
    records,
    records_query,
)
from orchestrator.store.sql._schema import dead_letters, sagas
from orchestrator.store.sql._sqlite import SqliteWriter, Written, brief

__all__ = ["SqlSagaStore", "WriterStats"]

log = logging.getLogger("orchestrator.store.sql")

MAX_BATCH: Final = 256
"""Most writes applied in one transaction: bounds a transaction's size and the wait behind it."""
SQLITE_COMMIT_INTERVAL: Final = 0.005
"""SQLite's default pacing: at most one commit per 5 ms.

A commit's cost is mostly its pages (each index a saga touches is a page in
the WAL), which the writes in one transaction share: under load, pacing
commits puts several times more writes in each for a few milliseconds of
latency, and a write after a quiet spell still commits at once (see
bench/README.md for what it saves). PostgreSQL paces itself: writes queue
while a transaction's round trip is under way."""
LOCK_TIMEOUT_SECONDS: Final = 5.0
"""How long a SQLite write waits for another connection's write lock before failing."""
CHECKPOINT_SECONDS: Final = 0.5
"""How often SQLite's WAL is checkpointed into the database file, when anything was written."""


def _now() -> datetime:
    return datetime.now(UTC)


class WriterStats:
    """What the writer has done so far: how well group commit is batching."""

    __slots__ = ("failed_batches", "largest_batch", "ops", "transactions")

    def __init__(self) -> None:
        self.ops = 0
        """Writes committed (or refused, or failed on their own)."""
        self.transactions = 0
        """Transactions committed."""
        self.largest_batch = 0
        self.failed_batches = 0
        """Transactions that failed (their ops were failed or split and retried)."""


def _normalize_url(raw: str) -> URL:
    url = make_url(raw)
    backend = url.get_backend_name()
    # A bare `sqlite://` or `postgresql://` names no driver: take ours.
    driver = url.get_driver_name() if "+" in url.drivername else ""
    if backend == "sqlite" and driver in ("", "aiosqlite"):
        url = url.set(drivername="sqlite+aiosqlite")
        database = url.database or ""
        if (
            database in ("", ":memory:")
            or database.startswith("file::memory:")
            or "mode=memory" in database
            or url.query.get("mode") == "memory"
        ):
            raise ValueError(
                "SqlSagaStore needs a SQLite file, not an in-memory database; "
                "use memory:// (InMemorySagaStore) for a store in process memory"
            )
        return url
    if backend == "postgresql" and driver in ("", "asyncpg"):
        return url.set(drivername="postgresql+asyncpg")
    raise ValueError(
        f"unsupported saga store URL {url.render_as_string(hide_password=True)!r}: "
        "use sqlite+aiosqlite:///path.db or postgresql+asyncpg://user@host:port/db"
    )


def _switch_to_wal(cursor: Any) -> None:
    # Switching needs the file to itself, and SQLite answers "database is locked" at once,
    # busy_timeout or not, while another connection is opening it too (replicas starting
    # together on a new file). Only then, and briefly, does this sleep block the loop.
    for attempt in range(100):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            if attempt == 99:
                raise
            time.sleep(0.02)


def _sqlite_pragmas(engine: AsyncEngine) -> None:
    """Pragmas on every connection, and transactions left to us (see `_begin_write`)."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA journal_mode")
        if cursor.fetchone()[0] != "wal":  # WAL sticks to the file: only its first opening
            _switch_to_wal(cursor)
        # In WAL mode NORMAL loses no committed transaction on a process crash (only on
        # power loss), and commits without an fsync each.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
        # The sqlite3 driver's own BEGIN is deferred and implicit; we emit BEGIN IMMEDIATE
        # for writes ourselves, and reads run without one.
        dbapi_connection.isolation_level = None


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
        `announce_changes` (PostgreSQL only): NOTIFY every saga write and LISTEN for
        every replica's; off, this store neither announces nor hears."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if commit_interval is not None and commit_interval < 0:
            raise ValueError("commit_interval must not be negative")
        self._url = _normalize_url(url)
        self._sqlite = self._url.get_backend_name() == "sqlite"
        if commit_interval is None:
            commit_interval = SQLITE_COMMIT_INTERVAL if self._sqlite else 0.0
        self._commit_interval = commit_interval
        self._max_batch = max_batch
        # A failed batch's error would otherwise quote every op's parameters (payloads of
        # other requests) to every caller in it, and to the logs.
        if self._sqlite:
            # Every connection is returned either committed, rolled back or without a
            # transaction (reads run without one): the pool's reset ROLLBACK would only
            # cost a trip to the aiosqlite thread.
            self._engine = create_async_engine(
                self._url, hide_parameters=True, pool_reset_on_return=None
            )
            _sqlite_pragmas(self._engine)
        else:
            self._engine = create_async_engine(self._url, hide_parameters=True)
        self._queue: list[Op] = []
        self._wake = asyncio.Event()
        self._last_commit = 0.0
        self._writer: asyncio.Task[None] | None = None
        self._sqlite_writer: SqliteWriter | None = None
        self._closing = False
        self.stats = WriterStats()
        self._position_query = text(POSITION.format(":f", ":r"))
        self._get_query = records_query(
            sagas.c.facade == bindparam("b_facade"), sagas.c.request_id == bindparam("b_id")
        )
        self._actions_query = actions_query()
        self._letter_query = letters_query(dead_letters.c.id == bindparam("b_id"))
        self._announce = announce_changes and not self._sqlite
        self.change_feed: PgChangeFeed | None = (
            PgChangeFeed(self._url.set(drivername="postgresql").render_as_string(False))
            if self._announce
            else None
        )
        """The LISTENing side of the change feed, on PostgreSQL (None on SQLite)."""

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._url.render_as_string(hide_password=True)

    # --- lifecycle ---

    async def start(self) -> None:
        """Create or upgrade the schema (its migrations), and start the writer."""
        if self._writer is not None or self._sqlite_writer is not None:
            return
        revision = await upgrade_schema(self._engine)
        log.info("saga store schema at revision %s", revision, extra={"store": self.url})
        self._closing = False
        if self._sqlite:
            writer = SqliteWriter(
                self._url.database or "",
                max_batch=self._max_batch,
                commit_interval=self._commit_interval,
                checkpoint_interval=CHECKPOINT_SECONDS,
                lock_timeout=LOCK_TIMEOUT_SECONDS,
            )
            writer.on_written = self._written
            await writer.open()
            self._sqlite_writer = writer
            return
        self._wake = asyncio.Event()  # bound to the loop that runs the writer
        self._writer = asyncio.create_task(self._write_loop(), name="saga-store-writer")
        if self.change_feed is not None:
            self.change_feed.start()

    @property
    def announces_changes(self) -> bool:
        """True while this store LISTENs: every replica's committed writes reach the
        subscribers at once (PostgreSQL only)."""
        return self.change_feed is not None and self.change_feed.live

    def subscribe_changes(
        self, changed: ChangeListener, gap: GapListener | None = None
    ) -> Callable[[], None]:
        """On PostgreSQL, hear of every replica's committed saga writes (see
        `SagaStore.subscribe_changes`); on SQLite, nothing is ever called."""
        if self.change_feed is None:
            return super().subscribe_changes(changed, gap)
        return self.change_feed.subscribe(changed, gap)

    async def _begin_write(self, conn: AsyncConnection) -> None:
        """Begin a writing transaction on `conn`."""
        await conn.begin()
        if self._sqlite:
            # Take the write lock up front, waiting up to busy_timeout for it: a deferred
            # BEGIN that reads, then writes, fails at once with SQLITE_BUSY when another
            # connection wrote in between. SQLAlchemy's commit and rollback end it.
            driver = (await conn.get_raw_connection()).driver_connection
            if driver is None:  # only after the connection was invalidated
                raise RuntimeError("the SQLite connection is gone")
            await driver.execute("BEGIN IMMEDIATE")

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        """A writing transaction: committed at the end, rolled back on an exception."""
        async with self._engine.connect() as conn:
            await self._begin_write(conn)
            yield conn
            await conn.commit()

    async def close(self) -> None:
        """Apply every queued write, stop the writer and the listener, and disconnect."""
        if self.change_feed is not None:
            await self.change_feed.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            self._closing = True
            self._wake.set()
            await asyncio.wait([writer])
        sqlite_writer, self._sqlite_writer = self._sqlite_writer, None
        if sqlite_writer is not None:
            self._closing = True
            await sqlite_writer.close()
        await self._engine.dispose()

    # --- writes, through the writer ---

    def _submit(self, op: Op) -> asyncio.Future[Any]:
        if self._closing or (self._writer is None and self._sqlite_writer is None):
            raise RuntimeError("the saga store is not running (start() it; is it closed?)")
        if self._sqlite_writer is not None:
            self._sqlite_writer.submit(op)
            return op.future
        self._queue.append(op)
        self._wake.set()
        return op.future

    def _written(self, written: Written) -> None:
        """Hand the SQLite writer's outcomes to their callers (on the loop)."""
        self.stats.ops += len(written.outcomes)
        self.stats.transactions += written.transactions
        self.stats.failed_batches += written.failed
        self.stats.largest_batch = max(self.stats.largest_batch, len(written.outcomes))
        for op, outcome in written.outcomes:
            _resolve(op, outcome)

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

    # --- the PostgreSQL writer ---

    async def _write_loop(self) -> None:
        batch: list[Op] = []
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                wait = self._last_commit + self._commit_interval - time.monotonic()
                if wait > 0 and len(self._queue) < self._max_batch:
                    await asyncio.sleep(wait)
                else:
                    # One turn of the loop, free: the tasks already woken (answers from
                    # upstreams, say) queue their writes into this transaction too.
                    await asyncio.sleep(0)
                self._last_commit = time.monotonic()
                taken = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                # A caller cancelled before its write began gets no write.
                batch = [op for op in taken if not op.future.cancelled()]
                if batch:
                    await self._write_batch(batch)
                batch = []
        finally:
            # Only on cancellation or a bug: nobody must wait forever.
            stopped = RuntimeError("the saga store writer stopped")
            for op in [*batch, *self._queue]:
                if not op.future.done():
                    op.future.set_exception(stopped)
            self._queue.clear()

    async def _write_batch(self, ops: Sequence[Op]) -> None:
        """Apply `ops` in one transaction, splitting it when one op may have spoiled it."""
        try:
            outcomes = await self._transaction(ops)
        except BatchFailed as failed:
            self.stats.failed_batches += 1
            if failed.isolate and len(ops) > 1:
                # A statement failed: maybe one op's data, maybe a deadlock. Everything was
                # rolled back, so retry the halves, in order (per-saga order holds), until
                # the bad op is alone: log2(n) extra transactions per bad op.
                log.warning(
                    "saga store batch of %d writes failed (%s); retrying in halves",
                    len(ops),
                    brief(failed.cause),
                )
                middle = len(ops) // 2
                await self._write_batch(ops[:middle])
                await self._write_batch(ops[middle:])
                return
            for op in ops:
                _resolve(op, failed.cause)
            return
        self.stats.ops += len(ops)
        self.stats.transactions += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(ops))
        for op in ops:
            _resolve(op, outcomes.get(op))

    async def _transaction(self, ops: Sequence[Op]) -> dict[Op, object]:
        """Apply `ops` in one transaction and return each op's outcome once committed."""
        stage = "connect"
        try:
            async with self._engine.connect() as conn:
                await self._begin_write(conn)
                stage = "execute"
                outcomes = await apply_batch(conn, ops, announce=self._announce)
                stage = "commit"
                await conn.commit()
                return outcomes
        except Exception as exc:
            lost = isinstance(exc, DBAPIError) and exc.connection_invalidated
            # Only a failed statement may be one op's fault. No connection or a lost one
            # fail the whole batch: retrying op by op would multiply the wait for nothing.
            # A failed COMMIT is not retried either: it may have committed.
            raise BatchFailed(exc, isolate=stage == "execute" and not lost) from exc

    # --- reads ---

    async def get(self, facade: str, request_id: str) -> SagaRecord | None:
        """The saga with its steps in order, or None."""
        if self._sqlite_writer is not None:
            return self._sqlite_writer.get(facade, request_id)
        async with self._engine.connect() as conn:
            result = await conn.execute(self._get_query, {"b_facade": facade, "b_id": request_id})
            found = records(result)
        return found[0] if found else None

    async def position(self, facade: str, request_id: str) -> Position | None:
        """Where the saga stands, or None: a lighter read than `get`."""
        if self._sqlite_writer is not None:
            return self._sqlite_writer.position(facade, request_id)
        async with self._engine.connect() as conn:
            result = await conn.execute(self._position_query, {"f": facade, "r": request_id})
            return position(result.all())

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


def _resolve(op: Op, outcome: object) -> None:
    if op.future.done():  # its caller was cancelled meanwhile
        return
    if isinstance(outcome, BaseException):
        op.future.set_exception(outcome)
    else:
        op.future.set_result(outcome)
