"""The PostgreSQL backend of the SQL store: a writer task on asyncpg, and the change feed.

The writer is a task: what was queued while a transaction's round trip was
under way (up to `max_batch`) is the next transaction, a few set-based
statements (`_postgres`). Each transaction that changed sagas also NOTIFYs
their keys, and each store LISTENs on a connection of its own (`_listen`):
replicas sharing the database hear of each other's writes as they commit.

SQLAlchemy keeps its pool, the migrations and the listing queries; the hot path
runs on asyncpg itself, without SQLAlchemy's execution layer, which cost more
CPU per statement than asyncpg's own work: the writer's transactions on the
asyncpg connection under one checked out of SQLAlchemy's pool, and point reads
(a saga's position, a saga by its key) on an asyncpg pool of their own
(`READ_POOL_SIZE`). Errors still reach callers as SQLAlchemy's `DBAPIError`s.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from sqlalchemy import bindparam
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from orchestrator.store.records import Position, SagaRecord
from orchestrator.store.sql._asyncpg import (
    Connection,
    as_dbapi_error,
    connection,
    forget_if_lost,
)
from orchestrator.store.sql._listen import PgChangeFeed
from orchestrator.store.sql._ops import BatchFailed, Op
from orchestrator.store.sql._plans import PLANNED_PER_EXECUTION, PLANS_KEPT, PlanGate
from orchestrator.store.sql._postgres import apply_batch
from orchestrator.store.sql._postgres_one import apply_in_one, fits_one_statement
from orchestrator.store.sql._records import POSITION, position, records, records_query
from orchestrator.store.sql._schema import sagas
from orchestrator.store.sql._writer import Backend, Halves, Writer, WriterOptions, Written, brief

__all__ = ["CLOSE_SECONDS", "POOL_SIZE", "READ_POOL_SIZE", "PostgresBackend", "PostgresWriter"]

log = logging.getLogger("orchestrator.store.sql")

POOL_SIZE: Final = 10
"""Connections a store keeps to PostgreSQL at most, in two pools: its point reads' (see
`READ_POOL_SIZE`), and SQLAlchemy's (the writer's, the listing queries', the migrations'); a
change feed has one more of its own. Neither pool overflows: with SQLAlchemy's default
overflow, a burst of reads (a hop's check for each of 64 sagas in flight) opened and closed
connections by the dozen, each a server process started and stopped."""
CLOSE_SECONDS: Final = 5.0
"""How long closing the store waits for point reads in progress."""
READ_POOL_SIZE: Final = 6
"""Of `POOL_SIZE`, the connections of the point reads (a saga's position, a saga by its key):
an asyncpg pool of their own, without SQLAlchemy's checkout and execution layers."""


async def _session_kept(_connection: Any) -> None:
    """How a point read's connection is reset when it goes back to its pool: not at all.

    asyncpg's default sends a reset query with every release (`pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL`), a second round trip for each read. The point
    reads leave nothing to reset: each is one SELECT outside a transaction, taking no
    lock, opening no cursor, listening to nothing and setting nothing. asyncpg still rolls
    back a transaction left open before it calls this."""


class PostgresBackend(Backend):
    """A PostgreSQL database through asyncpg; it paces itself (writes queue while a
    transaction's round trip is under way), so commits are not paced by default."""

    commit_interval = 0.0

    def __init__(self, url: URL) -> None:
        if importlib.util.find_spec("asyncpg") is None:
            raise ValueError(
                "a PostgreSQL saga store needs asyncpg: pip install 'saga-orchestrator[postgres]'"
            )
        super().__init__(url.set(drivername="postgresql+asyncpg"))

    def engine(self) -> AsyncEngine:
        """An asyncpg engine that hides statement parameters in its errors, with a pool of
        `POOL_SIZE` connections and no overflow: a read waits for a connection of the pool
        rather than opening one of its own (PostgreSQL starts a process per connection);
        its sessions plan each execution (`_plans`: the writer's own connection changes
        that once the tables have filled)."""
        return create_async_engine(
            self.url,
            hide_parameters=True,
            pool_size=POOL_SIZE - READ_POOL_SIZE,
            max_overflow=0,
            connect_args={"server_settings": PLANNED_PER_EXECUTION},
        )

    def writer(self, engine: AsyncEngine, options: WriterOptions) -> PostgresWriter:
        """The writer task on `engine`'s connections, point reads on a pool of their own."""
        return PostgresWriter(
            engine, options, dsn=self.url.set(drivername="postgresql").render_as_string(False)
        )

    def change_feed(self) -> PgChangeFeed:
        """LISTENing on a plain asyncpg connection of its own."""
        return PgChangeFeed(self.url.set(drivername="postgresql").render_as_string(False))


class PostgresWriter(Writer):
    """A task applying each batch in one transaction of set-based statements."""

    def __init__(self, engine: AsyncEngine, options: WriterOptions, *, dsn: str) -> None:
        super().__init__(options)
        self._engine = engine
        self._dsn = dsn
        self._read_pool: Any = None  # an asyncpg.Pool (asyncpg is an optional dependency)
        self._announce = options.announce
        self._queue: list[Op] = []
        self._wake = asyncio.Event()
        self._last_commit = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._connection: Connection | None = None
        self._plans = PlanGate()
        self._keeping: Connection | None = None  # the writer's connection once it keeps plans
        self.connected: Callable[[int | None], None] | None = None
        """Told the server process of each connection the writer takes to write on, and
        None before it gives one up (the change feed tells this store's writes by it)."""
        self._position_query = POSITION.format("$1", "$2")
        compiled = records_query(
            sagas.c.facade == bindparam("b_facade"), sagas.c.request_id == bindparam("b_id")
        ).compile(dialect=engine.dialect)
        self._get_query = str(compiled)
        self._get_order = compiled.positiontup or ()

    async def open(self) -> None:
        """Open the point reads' pool, and start the writer task."""
        import asyncpg  # type: ignore[import-untyped]  # optional: imported once it is needed

        self._read_pool = await asyncpg.create_pool(
            self._dsn,
            min_size=1,
            max_size=READ_POOL_SIZE,
            reset=_session_kept,
            server_settings=PLANNED_PER_EXECUTION,
        )
        self._closing = False
        self._wake = asyncio.Event()  # bound to the loop that runs the writer
        self._task = asyncio.create_task(self._write_loop(), name="saga-store-writer")

    def submit(self, op: Op) -> None:
        """Queue `op` for the next transaction."""
        self._queue.append(op)
        self._wake.set()

    async def close(self) -> None:
        """Apply what is queued, then stop the task."""
        task, self._task = self._task, None
        if task is not None:
            self._closing = True
            self._wake.set()
            await asyncio.wait([task])
        await self._release()
        pool, self._read_pool = self._read_pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), CLOSE_SECONDS)
            except TimeoutError:
                pool.terminate()  # a read that outlived the store: it fails

    async def get(self, facade: str, request_id: str) -> SagaRecord | None:
        """The saga, read on a connection of the point reads' pool, outside any transaction."""
        values = {"b_facade": facade, "b_id": request_id}
        found = records(await self._read(self._get_query, *(values[n] for n in self._get_order)))
        return found[0] if found else None

    async def position(self, facade: str, request_id: str) -> Position | None:
        """Where the saga stands, read on a connection of the point reads' pool, outside any
        transaction."""
        return position(await self._read(self._position_query, facade, request_id))

    async def _read(self, sql: str, *args: Any) -> list[Any]:
        pool = self._read_pool
        if pool is None:
            raise RuntimeError("the saga store is not running (start() it; is it closed?)")
        async with pool.acquire() as conn:
            try:
                rows: list[Any] = await conn.fetch(sql, *args)
            except Exception as exc:
                lost = _closed(conn)
                if lost:
                    # The server ended it, and likely the others opened before it with it (a
                    # restart): each is replaced when next taken, rather than failing a read.
                    await pool.expire_connections()
                if not _from_driver(exc):
                    raise
                raise as_dbapi_error(exc, lost=lost) from exc
        return rows

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
                    await self._write(batch)
                batch = []
                if self._plans.due(time.monotonic()):
                    await self._check_plans()
        finally:
            # Only on cancellation or a bug: nobody must wait forever.
            stopped = RuntimeError("the saga store writer stopped")
            for op in [*batch, *self._queue]:
                if not op.future.done():
                    op.future.set_exception(stopped)
            self._queue.clear()

    async def _write(self, ops: Sequence[Op]) -> None:
        """Apply `ops` in one transaction, in halves when one op may have spoiled it."""
        written = Written()
        halves = Halves(ops, written)
        for part in halves:
            try:
                halves.committed(part, await self._transaction(part))
            except BatchFailed as failed:
                halves.failed(part, failed)
        self.hand_over(written)

    async def _transaction(self, ops: Sequence[Op]) -> dict[Op, object]:
        """Apply `ops` in one transaction and return each op's outcome once committed.

        The transaction is asyncpg's own, on the writer's connection (see `_held`); its
        statements go there (see `_postgres`). A batch of the happy path alone is one
        statement, committed by itself (see `_postgres_one`)."""
        stage = "connect"
        try:
            raw = await self._held()
            transaction = None
            try:
                if fits_one_statement(ops):
                    # The happy path's batch: one statement, its own transaction.
                    stage = "execute"
                    return await apply_in_one(raw, ops, announce=self._announce)
                transaction = raw.driver.transaction()
                await transaction.start()
                stage = "execute"
                outcomes = await apply_batch(raw, ops, announce=self._announce)
                stage = "commit"
                await transaction.commit()
            except BaseException as exc:
                usable = not raw.driver.is_closed()
                if usable and stage == "execute" and transaction is not None:
                    try:
                        await transaction.rollback()
                    except Exception:
                        usable = False  # in a state nobody should inherit
                if not usable:
                    await self._drop(raw)
                if isinstance(exc, Exception) and _from_driver(exc):
                    raise as_dbapi_error(exc, lost=raw.driver.is_closed()) from exc
                raise
            return outcomes
        except Exception as exc:
            lost = (isinstance(exc, DBAPIError) and exc.connection_invalidated) or isinstance(
                exc, OSError
            )
            # Only a failed statement may be one op's fault. No connection or a lost one
            # fail the whole batch: retrying op by op would multiply the wait for nothing.
            # A failed COMMIT is not retried either: it may have committed.
            raise BatchFailed(exc, isolate=stage == "execute" and not lost) from exc

    async def _check_plans(self) -> None:
        """Ask whether the tables have filled (see `_plans`); once they have, the point reads'
        new connections and the writer's keep their plans. A failed question is asked again
        later: meanwhile every execution is planned, as before."""
        raw = self._connection
        if raw is None:
            return
        try:
            if not await self._plans.ask(raw.driver, time.monotonic()):
                return
        except Exception as exc:
            log.debug("saga store: could not size its tables: %s", brief(exc))
            return
        pool = self._read_pool
        if pool is not None:
            pool.set_connect_args(self._dsn, server_settings=PLANS_KEPT)
            await pool.expire_connections()  # each replaced as it is next taken
        log.info("saga store: its tables have filled; its writes and point reads keep their plans")
        with contextlib.suppress(Exception):  # a lost connection: its successor is set
            await self._keep_plans(raw)

    async def _keep_plans(self, raw: Connection) -> None:
        for name, value in PLANS_KEPT.items():  # SET takes one setting at a time
            await raw.driver.execute(f"SET {name} = {value}")
        self._keeping = raw

    async def _held(self) -> Connection:
        """The writer's connection, checked out of the pool once and kept between batches
        (a checkout per batch cost more CPU than a small batch's statements); SQLAlchemy's
        connection stays outside any transaction, so it holds nothing between them."""
        if self._connection is None:
            conn = await self._engine.connect()
            try:
                self._connection = await connection(conn)
            except BaseException:
                await conn.close()
                raise
            if self.connected is not None:
                self.connected(self._connection.driver.get_server_pid())
            if self._plans.filled:
                await self._keep_plans(self._connection)
        return self._connection

    async def _drop(self, raw: Connection) -> None:
        """Stop using the writer's connection: lost (the server ended it), SQLAlchemy drops it
        and every pooled one opened before it; merely unusable, just it."""
        if raw.driver.is_closed():
            await forget_if_lost(raw)
        else:
            with contextlib.suppress(DBAPIError, OSError):
                await raw.sa.invalidate()
        await self._release()

    async def _release(self) -> None:
        """Give the writer's connection back to the pool (which drops it if it was lost)."""
        held, self._connection = self._connection, None
        if held is not None and self.connected is not None:
            self.connected(None)
        if held is not None:
            with contextlib.suppress(DBAPIError, OSError):
                if held is self._keeping:
                    # Not for a listing query: its session keeps planning each execution.
                    self._keeping = None
                    await held.sa.invalidate()
                await held.sa.close()


def _from_driver(exc: Exception) -> bool:
    """Whether asyncpg raised `exc` itself (a statement's errors come wrapped already); asyncpg
    is an optional dependency, so its classes are not imported here."""
    return isinstance(exc, OSError) or type(exc).__module__.startswith("asyncpg.")


def _closed(conn: Any) -> bool:
    """Whether a pooled asyncpg connection is closed; one the pool already took back from
    under its user (it does so with a connection that broke) counts as closed."""
    try:
        return bool(conn.is_closed())
    except Exception:  # asyncpg's InterfaceError: "released back to the pool"
        return True
