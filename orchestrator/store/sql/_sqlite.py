"""The SQLite backend of the SQL store: its engine, its writer and point reads on the loop.

On SQLite, SQLAlchemy's async layer costs more than the writes themselves:
every statement is a greenlet switch and a trip to aiosqlite's thread and
back. A thread of our own fared little better: each statement releases the
GIL, and getting it back meant waiting for the busy loop. So the writer
applies its batches on the loop, with a few prepared statements per op
(sqlite3 caches them) between BEGIN and COMMIT. Without an fsync per commit
that is cheaper than any handoff, and the loop never waits for a lock
(busy_timeout 0) or a checkpoint (another connection runs those). Ops run in
queue order, so a saga's writes keep their order without rounds. Point reads
(one saga by its key) use the same connection between batches: a few tens of
microseconds, where a trip to a thread costs more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import aiosqlite
from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from orchestrator.store.records import Position, SagaRecord
from orchestrator.store.sql._host_feed import HostChangeFeed
from orchestrator.store.sql._ops import BatchFailed, JournalBroken, Op
from orchestrator.store.sql._records import POSITION, SQLITE_GET, position, records
from orchestrator.store.sql._schema import sqlite_time
from orchestrator.store.sql._sqlite_apply import apply_op
from orchestrator.store.sql._writer import Backend, Halves, Writer, WriterOptions, Written, brief

__all__ = [
    "CHECKPOINT_SECONDS",
    "LOCK_TIMEOUT_SECONDS",
    "SQLITE_COMMIT_INTERVAL",
    "SqliteBackend",
    "SqliteWriter",
]

log = logging.getLogger("orchestrator.store.sql")

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

_POSITION: Final = POSITION.format("?", "?")


class SqliteBackend(Backend):
    """A SQLite file, in WAL mode with synchronous=NORMAL: a commit survives the process
    crashing, not the machine losing power. An in-memory database is refused: the
    writer's connection and the readers' would each see a database of their own."""

    commit_interval = SQLITE_COMMIT_INTERVAL

    def __init__(self, url: URL) -> None:
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
        super().__init__(url)

    def engine(self) -> AsyncEngine:
        """An engine whose connections are in WAL mode, leave transactions to us, and are
        returned to the pool without a reset."""
        # Every connection is returned either committed, rolled back or without a
        # transaction (reads run without one): the pool's reset ROLLBACK would only
        # cost a trip to the aiosqlite thread.
        engine = create_async_engine(self.url, hide_parameters=True, pool_reset_on_return=None)
        event.listen(engine.sync_engine, "connect", _on_connect)
        return engine

    def change_feed(self) -> HostChangeFeed:
        """The processes writing the file tell each other with Unix datagrams."""
        return HostChangeFeed(self.url.database or "")

    def writer(self, engine: AsyncEngine, options: WriterOptions) -> SqliteWriter:
        """The writer on a sqlite3 connection of its own (its batches are announced by the
        store's `HostChangeFeed`)."""
        return SqliteWriter(
            self.url.database or "",
            options,
            checkpoint_interval=CHECKPOINT_SECONDS,
            lock_timeout=LOCK_TIMEOUT_SECONDS,
        )


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    """Pragmas on every connection of the engine, and transactions left to us."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA journal_mode")
    if cursor.fetchone()[0] != "wal":  # WAL sticks to the file: only its first opening
        _switch_to_wal(cursor)
    # In WAL mode NORMAL loses no committed transaction on a process crash (only on
    # power loss), and commits without an fsync each.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
    # The sqlite3 driver's own BEGIN is deferred and implicit; reads run without one,
    # and the migrations begin their own.
    dbapi_connection.isolation_level = None


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


class _Busy(Exception):
    """Another connection holds SQLite's write lock: the batch is tried again shortly."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class SqliteWriter(Writer):
    """The writing connection to a SQLite file, used on the event loop itself.

    Writes queued while the loop runs are applied in one transaction at its
    next turn, and their callers resolved right after the commit. Commits are
    paced, one per `commit_interval` at most, so that under load each shares
    its pages and WAL frames among more writes, while a write after a quiet
    spell commits at once. In WAL mode with synchronous=NORMAL a commit
    writes to the OS's page cache and does not fsync, so a batch costs the
    loop tens of microseconds: less than handing it to a thread.

    The loop never sleeps on the write lock (busy_timeout 0): while another
    connection holds it (another process) the batch is tried again with
    backoff, and only after `lock_timeout` do its callers get the error.

    Checkpoints copy the WAL into the database file and fsync, so they run
    on a connection of their own, off the loop, every `checkpoint_interval`
    while there are writes: first alongside the writes, then once more while
    this writer holds its writes back. That second pass copies only what came
    in during the first, and leaves the whole WAL checkpointed, so the next
    write starts the file over and it never grows without bound.
    """

    def __init__(
        self,
        path: str,
        options: WriterOptions,
        *,
        checkpoint_interval: float,
        lock_timeout: float,
    ) -> None:
        super().__init__(options)
        self._path = path
        self._checkpoint_interval = checkpoint_interval
        self._lock_timeout = lock_timeout
        self._pending: list[Op] = []
        self._flush_handle: asyncio.Handle | None = None
        self._checkpointing: asyncio.Task[None] | None = None
        self._holding = False
        self._busy_since: float | None = None
        self._busy_delay = 0.0
        self._last_flush = 0.0
        self._last_checkpoint = 0.0
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drained = asyncio.Event()
        self.checkpoints = 0
        """Checkpoints run so far."""

    async def open(self) -> None:
        """Connect both connections (the file exists in WAL mode: the schema was made)."""
        loop = self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._drained.set()
        self._last_checkpoint = loop.time()
        # isolation_level None: no implicit transactions, we BEGIN IMMEDIATE ourselves.
        conn = sqlite3.connect(self._path, timeout=0, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")  # see the store's pragmas
            conn.execute("PRAGMA wal_autocheckpoint=0")  # it would fsync on the loop
            self._checkpointer = await aiosqlite.connect(self._path, isolation_level=None)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def get(self, facade: str, request_id: str) -> SagaRecord | None:
        """The saga, read on the loop from the committed state (between batches)."""
        found = records(self._read(SQLITE_GET, facade, request_id))
        return found[0] if found else None

    async def position(self, facade: str, request_id: str) -> Position | None:
        """Where the saga stands, read on the loop from the committed state (between batches)."""
        return position(self._read(_POSITION, facade, request_id))

    def _read(self, query: str, facade: str, request_id: str) -> list[Any]:
        conn = self._conn
        if conn is None:
            raise RuntimeError("the SQLite store is closed")
        started = time.thread_time()
        try:
            return conn.execute(query, (facade, request_id)).fetchall()
        except sqlite3.Error as exc:
            raise DBAPIError.instance(None, None, exc, sqlite3.Error, hide_parameters=True) from exc
        finally:
            self._stats.loop_seconds += time.thread_time() - started

    def submit(self, op: Op) -> None:
        """Queue `op`; its future is resolved once committed."""
        self._pending.append(op)
        self._drained.clear()
        if self._flush_handle is None and not self._holding:
            self._schedule_flush()

    async def close(self) -> None:
        """Apply what is queued, then disconnect."""
        if self._conn is None:
            return
        if self._flush_handle is not None and self._busy_since is None:
            self._flush_handle.cancel()  # no pacing any more: flush now
            self._schedule_flush(0)
        await self._drained.wait()
        if self._checkpointing is not None:
            await asyncio.wait([self._checkpointing])
        self._conn.close()
        self._conn = None
        if self._checkpointer is not None:
            await self._checkpointer.close()
            self._checkpointer = None

    def _schedule_flush(self, delay: float | None = None) -> None:
        loop = self._loop
        assert loop is not None
        if delay is None:
            delay = self._last_flush + self._commit_interval - loop.time()
        if delay > 0:
            self._flush_handle = loop.call_later(delay, self._flush)
        else:
            self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        loop = self._loop
        assert loop is not None
        self._last_flush = loop.time()
        taken = self._pending[: self._max_batch]
        # A caller cancelled before its write began gets no write (as on PostgreSQL).
        ops = [op for op in taken if not op.future.cancelled()]
        written = Written()
        try:
            if ops:
                self._write(ops, written)
        except _Busy as busy:
            if self._busy_since is None:
                self._busy_since = self._last_flush
            done = len(written.outcomes)  # what went through before the lock was lost
            if self._last_flush - self._busy_since < self._lock_timeout:
                self._busy_delay = min(max(self._busy_delay * 2, 0.001), 0.05)
                del self._pending[: self._pending.index(ops[done])]
                self._schedule_flush(self._busy_delay)
                if done:
                    self.hand_over(written)
                return
            written.failed += 1
            written.outcomes += [(op, busy.error) for op in ops[done:]]
        except Exception as exc:
            # A bug, not the database: this batch's callers get it, the writer goes on
            # (a stuck writer would leave every caller waiting).
            log.exception("saga store writer failed on a batch")
            written = Written([(op, exc) for op in ops], failed=1)
        self._busy_since = None
        self._busy_delay = 0.0
        del self._pending[: len(taken)]
        if (
            written.transactions
            and self._checkpointing is None
            and self._last_flush - self._last_checkpoint >= self._checkpoint_interval
        ):
            self._checkpointing = loop.create_task(self._checkpoint())
        if self._pending:
            self._schedule_flush(0)
        elif self._checkpointing is None:
            self._drained.set()
        self.hand_over(written)

    async def _checkpoint(self) -> None:
        checkpointer = self._checkpointer
        assert checkpointer is not None and self._loop is not None
        try:
            await checkpointer.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
            self._holding = True
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
            await checkpointer.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
            self.checkpoints += 1
        except Exception as exc:
            log.warning("saga store checkpoint failed: %s", brief(exc))
        finally:
            self._holding = False
            self._last_checkpoint = self._loop.time()
            self._checkpointing = None
            if self._pending:
                self._schedule_flush(0)
            else:
                self._drained.set()

    def _write(self, ops: Sequence[Op], written: Written) -> None:
        """Apply `ops` in one transaction, in halves when one op may have spoiled it (the
        loop's CPU meanwhile counted in `WriterStats.loop_seconds`)."""
        started = time.thread_time()
        try:
            halves = Halves(ops, written)
            for part in halves:
                try:
                    halves.committed(part, self._apply(part))
                except BatchFailed as failed:
                    halves.failed(part, failed)
        finally:
            self._stats.loop_seconds += time.thread_time() - started

    def _apply(self, ops: Sequence[Op]) -> dict[Op, object]:
        conn = self._conn
        if conn is None:
            raise BatchFailed(RuntimeError("the SQLite writer is closed"), isolate=False)
        try:
            # The write lock up front; without it, nothing was done.
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            error = DBAPIError.instance(None, None, exc, sqlite3.Error, hide_parameters=True)
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
                raise _Busy(error) from exc
            raise BatchFailed(error, isolate=False) from exc
        stage = "execute"
        try:
            # One time for the transaction: when its writes become durable.
            at = sqlite_time(datetime.now(UTC))
            outcomes = {op: apply_op(conn, op, at) for op in ops}
            stage = "commit"
            conn.execute("COMMIT")
            return outcomes
        except JournalBroken as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise BatchFailed(exc, isolate=True) from exc
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            # Callers see the errors SQLAlchemy would raise (IntegrityError, OperationalError),
            # whichever backend. Only a failed statement may be one op's fault; a failed
            # COMMIT may have committed, and is not retried.
            error = DBAPIError.instance(None, None, exc, sqlite3.Error, hide_parameters=True)
            raise BatchFailed(error, isolate=stage == "execute") from exc
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
