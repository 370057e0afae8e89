"""The saga store on SQL: SQLite or PostgreSQL (asyncpg), with group commit.

Every saga writes its log several times (begin, each step's end with the next
one's start, its final state), so the store sits on the hot path of every
request. Writes are queued to one writer, which applies everything queued
since its previous transaction (up to `max_batch`) in one transaction and
resolves the callers only after the commit: each write still returns once
durable, but the sagas in flight share one commit instead of paying for it one
by one. A saga's ops keep their queue order; ops of different sagas may be
regrouped.

- On SQLite the writer is `_SqliteWriter`: its own sqlite3 connection, used
  on the event loop, commits paced to one per `SQLITE_COMMIT_INTERVAL` under
  load, checkpoints off the loop. Claims of orphans go through it too, so no
  other connection of the process ever holds the write lock.
- On PostgreSQL it is a task, and a batch is a few set-based statements (a
  second op of one saga goes to a later "round").

Reads go straight to the engine (aiosqlite or asyncpg).

When a batch's transaction fails, nothing of it was applied. If a statement
failed, the batch is split in halves and each retried, down to the bad op
alone, so one bad op (a NOT NULL, a too-long id, a deadlock victim) fails only
its caller. If the database itself failed (no connection, SQLite's write lock
not had within `LOCK_TIMEOUT_SECONDS`, connection lost) or the COMMIT did (it
may have committed, and step_started is not idempotent), every op of the
batch fails with that error, once: the callers' retries decide. A write to a
saga nobody began fails alone with KeyError, as in the in-memory store.

URLs: ``sqlite+aiosqlite:///path/to/file.db`` and
``postgresql+asyncpg://user@host:port/db`` (``sqlite://`` and ``postgresql://``
get those drivers). An in-memory SQLite database is refused: the writer's
connection and the readers' would each see a database of their own, and it
would not survive the process anyway; use `InMemorySagaStore` (``memory://``)
instead.
SQLite runs in WAL mode with synchronous=NORMAL: a commit survives the
process crashing, not the machine losing power.

Timestamps come from this process's clock (UTC), so replicas sharing a
PostgreSQL database need synchronized clocks, with `stale_after` well above
any skew.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import aiosqlite
from sqlalchemy import (
    Column,
    CursorResult,
    DateTime,
    Dialect,
    Executable,
    Index,
    Integer,
    MetaData,
    Row,
    Select,
    String,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    case,
    column,
    event,
    func,
    inspect,
    literal,
    null,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeEngine

from orchestrator.store.base import (
    BeginResult,
    SagaPage,
    SagaRecord,
    SagaState,
    SagaStore,
    StepRecord,
    StepState,
)

__all__ = ["SqlSagaStore", "WriterStats", "metadata", "replicas", "saga_steps", "sagas"]

log = logging.getLogger("orchestrator.store.sql")

MAX_BATCH: Final = 256
"""Most writes applied in one transaction: bounds a transaction's size and the wait behind it."""

SQLITE_COMMIT_INTERVAL: Final = 0.005
"""SQLite's default pacing: at most one commit per 5 ms.

A commit's cost is mostly its pages (each index a saga touches is a page in
the WAL), which the writes in one transaction share: under load, pacing
commits puts several times more writes in each for a few milliseconds of
latency, and a write after a quiet spell still commits at once (see
bench/README.md for what it saves). PostgreSQL
paces itself: writes queue while a transaction's round trip is under way."""
LOCK_TIMEOUT_SECONDS: Final = 5.0
"""How long a SQLite write waits for another connection's write lock before failing."""
CHECKPOINT_SECONDS: Final = 0.5
"""How often SQLite's WAL is checkpointed into the database file, when anything was written."""
CLAIM_BATCH: Final = 100
"""Most orphans one `claim_orphans` call takes; the next call takes the rest."""
MAX_PAGE_SIZE: Final = 500
_SCHEMA_LOCK_KEY: Final = 0x6F72636873616761
"""PostgreSQL advisory lock ("orchsaga") that serializes schema creation across replicas."""


class _UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on both backends.

    PostgreSQL keeps it as TIMESTAMPTZ. SQLite has no such type: it gets naive
    UTC text in a fixed-width format (SQLAlchemy's own DATETIME format), which
    sorts like time and costs one C call each way.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(26))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | str | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps UTC")
        if dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            return datetime.fromisoformat(value).replace(tzinfo=UTC)
        stamp: datetime = value
        return stamp if stamp.tzinfo is UTC else stamp.astimezone(UTC)


metadata = MetaData()

_RUNNING_ONLY: Final = "state = 'RUNNING'"
"""The partial index's condition; queries repeat it verbatim (a bound parameter would not
let the planners use the index)."""

sagas = Table(
    "sagas",
    metadata,
    Column("request_id", String(300), primary_key=True),
    Column("facade", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("state", String(32), nullable=False),
    Column("payload", Text, nullable=False),
    Column("payload_hash", String(128), nullable=False),
    Column("data", Text, nullable=False),
    # When `data` was last written (NULL: never). Until then the saga's data is that of
    # its last finished step: steps keep their own, so a step's end need not touch this row.
    Column("data_at", _UtcDateTime, nullable=True),
    Column("owner", String(128), nullable=False),
    Column("error_code", String(128), nullable=False),
    Column("error_reason", Text, nullable=False),
    Column("created_at", _UtcDateTime, nullable=False),
    Column("updated_at", _UtcDateTime, nullable=False),
    # list_sagas by facade (and state), newest first, keyset on (created_at, request_id).
    Index("ix_sagas_listing", "facade", "state", "created_at", "request_id"),
    # list_sagas without a facade: the default admin view would otherwise sort the table.
    Index("ix_sagas_created", "created_at", "request_id"),
    # claim_orphans: RUNNING sagas of one kind, grouped by owner. Partial: it holds only
    # the sagas in flight, so it stays small and a finished saga leaves it for good.
    Index(
        "ix_sagas_running",
        "kind",
        "owner",
        sqlite_where=text(_RUNNING_ONLY),
        postgresql_where=text(_RUNNING_ONLY),
    ),
)

saga_steps = Table(
    "saga_steps",
    metadata,
    Column("request_id", String(300), primary_key=True),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("name", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("started_at", _UtcDateTime, nullable=False),
    Column("finished_at", _UtcDateTime, nullable=True),
    Column("error", Text, nullable=False),
    # The saga's data as this step's end left it (NULL until it ends).
    Column("data", Text, nullable=True),
)

replicas = Table(
    "replicas",
    metadata,
    Column("owner", String(128), primary_key=True),
    Column("heartbeat_at", _UtcDateTime, nullable=False),
)


def _now() -> datetime:
    return datetime.now(UTC)


# --- the writer's queue -------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Op(abc.ABC):
    """One queued write; identity-hashed so a batch can map ops to outcomes."""

    at: datetime
    future: asyncio.Future[Any]

    @property
    @abc.abstractmethod
    def key(self) -> str:
        """Ops with one key keep their queue order; others may be regrouped."""


@dataclass(eq=False, slots=True)
class _SagaOp(_Op):
    request_id: str

    @property
    def key(self) -> str:
        return "s:" + self.request_id


@dataclass(eq=False, slots=True)
class _Begin(_SagaOp):
    """Its outcome is whether it created the saga."""

    facade: str
    kind: str
    payload: str
    payload_hash: str
    owner: str
    first_step: str

    def row(self) -> dict[str, Any]:
        """Its row for the begin statement."""
        return {
            "b_id": self.request_id,
            "b_facade": self.facade,
            "b_kind": self.kind,
            "b_payload": self.payload,
            "b_payload_hash": self.payload_hash,
            "b_owner": self.owner,
            "b_at": self.at,
        }

    def first_step_row(self) -> dict[str, Any]:
        """Its step 0, started, for the step_started statement."""
        return {"b_id": self.request_id, "b_idx": 0, "b_name": self.first_step, "b_at": self.at}


@dataclass(eq=False, slots=True)
class _SagaUpdate(_SagaOp):
    """A write to the saga's row or its steps'."""

    @property
    def touches_saga(self) -> bool:
        """Whether it writes the saga's row (every write but a step's plain end does)."""
        return True

    def saga_row(self) -> dict[str, Any]:
        """Its row for the saga UPDATE: None and "" keep what is there."""
        return {
            "b_id": self.request_id,
            "b_state": None,
            "b_data": None,
            "b_code": "",
            "b_reason": "",
            "b_at": self.at,
        }


@dataclass(eq=False, slots=True)
class _StepStarted(_SagaUpdate):
    index: int
    name: str

    def step_row(self) -> dict[str, Any]:
        return {"b_id": self.request_id, "b_idx": self.index, "b_name": self.name, "b_at": self.at}


@dataclass(eq=False, slots=True)
class _StepFinished(_SagaUpdate):
    index: int
    state: str
    data: str
    error: str
    next_step: str
    """Step `index + 1`, started in the same write ("" for none)."""
    saga_state: str | None
    error_code: str
    error_reason: str

    @property
    def touches_saga(self) -> bool:
        # The step row keeps the data; only a new saga state needs the saga row.
        return self.saga_state is not None

    def saga_row(self) -> dict[str, Any]:
        return {
            "b_id": self.request_id,
            "b_state": self.saga_state,
            "b_data": self.data,
            "b_code": self.error_code,
            "b_reason": self.error_reason,
            "b_at": self.at,
        }

    def next_step_row(self) -> dict[str, Any]:
        """Step `index + 1`, started, for the step_started statement."""
        return {
            "b_id": self.request_id,
            "b_idx": self.index + 1,
            "b_name": self.next_step,
            "b_at": self.at,
        }

    def step_row(self) -> dict[str, Any]:
        return {
            "b_id": self.request_id,
            "b_idx": self.index,
            "b_state": self.state,
            "b_error": self.error,
            "b_data": self.data,
            "b_at": self.at,
        }


@dataclass(eq=False, slots=True)
class _SetState(_SagaUpdate):
    state: str
    data: str | None
    error_code: str
    error_reason: str

    def saga_row(self) -> dict[str, Any]:
        return {
            "b_id": self.request_id,
            "b_state": self.state,
            "b_data": self.data,
            "b_code": self.error_code,
            "b_reason": self.error_reason,
            "b_at": self.at,
        }


@dataclass(eq=False, slots=True)
class _Heartbeat(_Op):
    owner: str

    @property
    def key(self) -> str:
        return "r:" + self.owner


@dataclass(eq=False, slots=True)
class _Claim(_Op):
    """SQLite's `claim_orphans`, applied by the writer: no other connection of this
    process then takes the write lock. Its outcome is the claimed request ids."""

    owner: str
    cutoff: datetime
    kind: str

    @property
    def key(self) -> str:
        return "c:" + self.owner


class _BatchFailed(Exception):
    """A batch's transaction failed; `isolate` says whether splitting it may help."""

    def __init__(self, cause: Exception, *, isolate: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.isolate = isolate


@dataclass(slots=True)
class WriterStats:
    """What the writer has done so far: how well group commit is batching."""

    ops: int = 0
    """Writes committed (or failed on their own, like a write to an unknown saga)."""
    transactions: int = 0
    """Transactions committed."""
    largest_batch: int = 0
    failed_batches: int = 0
    """Transactions that failed (their ops were failed or split and retried)."""


def _rounds(ops: Sequence[_Op]) -> list[list[_Op]]:
    """Split a batch into rounds, each with at most one op per key, in queue order.

    Within a round the ops touch different sagas (or replicas), so they can be
    regrouped into one statement per kind of op; a saga's second queued op lands
    in the next round, after its first.
    """
    rounds: list[list[_Op]] = []
    depth: dict[str, int] = {}
    for op in ops:
        n = depth.get(op.key, 0)
        depth[op.key] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(op)
    return rounds


# --- the PostgreSQL writer's statements -----------------------------------------------------------
#
# Each takes the rows of one round (one dict per op, bind names b_*, never column names,
# which SQLAlchemy reserves for VALUES). An executemany would be one server round of
# parse/bind/execute per row (about 30 us each), so the rows go as one array per column
# into a single set-based statement over unnest(): one execution, and one SQL text for
# asyncpg's prepared-statement cache whatever the batch size.


@dataclass(frozen=True, slots=True)
class _BatchStatements:
    begin: Executable
    """INSERT ... ON CONFLICT DO NOTHING RETURNING request_id: the ids it created."""
    saga_update: Executable
    """The saga row for step_started (updated_at), a step_finished with a saga state, and
    set_state."""
    step_started: Executable
    step_finished: Executable
    """RETURNING request_id, idx: the steps it found."""
    heartbeat: Executable


def _saga_update_values(
    state: ColumnElement[Any],
    data: ColumnElement[Any],
    code: ColumnElement[Any],
    reason: ColumnElement[Any],
    at: ColumnElement[Any],
) -> dict[str, ColumnElement[Any]]:
    # NULL state or data keeps it; an empty error keeps the one recorded earlier (a
    # COMPENSATED saga still says why it was compensated).
    return {
        "state": func.coalesce(state, sagas.c.state),
        "data": func.coalesce(data, sagas.c.data),
        "data_at": case((data.is_(None), sagas.c.data_at), else_=at),
        "error_code": case((code == "", sagas.c.error_code), else_=code),
        "error_reason": case((reason == "", sagas.c.error_reason), else_=reason),
        "updated_at": at,
    }


def _restart_step(excluded: Any) -> dict[str, Any]:
    """A step started again: RUNNING, one more attempt, its last ending forgotten."""
    return {
        "name": excluded.name,
        "state": StepState.RUNNING.value,
        "attempts": saga_steps.c.attempts + 1,
        "started_at": excluded.started_at,
        "finished_at": None,
        "error": "",
        "data": None,
    }


def _unnest(name: str, *columns: tuple[str, TypeEngine[Any]]) -> Any:
    """unnest(:b_a, :b_b, ...) AS name(a, b, ...): a table from one array per column."""
    arrays = [bindparam(f"b_{col}", type_=postgresql.ARRAY(type_)) for col, type_ in columns]
    return (
        func.unnest(*arrays)
        .table_valued(*(column(col, type_) for col, type_ in columns))
        .render_derived(name=name)
    )


def _postgres_batch_statements() -> _BatchStatements:
    at = DateTime(timezone=True)
    new = _unnest(
        "new",
        ("id", String()),
        ("facade", String()),
        ("kind", String()),
        ("payload", Text()),
        ("payload_hash", String()),
        ("owner", String()),
        ("at", at),
    )
    begin = (
        postgresql.insert(sagas)
        .from_select(
            [c.name for c in sagas.c],
            select(
                new.c.id,
                new.c.facade,
                new.c.kind,
                literal(SagaState.RUNNING.value),
                new.c.payload,
                new.c.payload_hash,
                literal(""),
                null(),
                new.c.owner,
                literal(""),
                literal(""),
                new.c.at,
                new.c.at,
            ),
        )
        .on_conflict_do_nothing(index_elements=[sagas.c.request_id])
        .returning(sagas.c.request_id)
    )
    change = _unnest(
        "change",
        ("id", String()),
        ("state", String()),
        ("data", Text()),
        ("code", String()),
        ("reason", Text()),
        ("at", at),
    )
    started = _unnest(
        "started", ("id", String()), ("idx", Integer()), ("name", String()), ("at", at)
    )
    step = postgresql.insert(saga_steps).from_select(
        [c.name for c in saga_steps.c],
        select(
            started.c.id,
            started.c.idx,
            started.c.name,
            literal(StepState.RUNNING.value),
            literal(1),
            started.c.at,
            null(),
            literal(""),
            null(),
        ),
    )
    ended = _unnest(
        "ended",
        ("id", String()),
        ("idx", Integer()),
        ("state", String()),
        ("error", Text()),
        ("data", Text()),
        ("at", at),
    )
    beats = _unnest("beats", ("owner", String()), ("at", at))
    beat = postgresql.insert(replicas).from_select(
        ["owner", "heartbeat_at"], select(beats.c.owner, beats.c.at)
    )
    return _BatchStatements(
        begin=begin,
        saga_update=update(sagas)
        .where(sagas.c.request_id == change.c.id)
        .values(
            _saga_update_values(
                change.c.state, change.c.data, change.c.code, change.c.reason, change.c.at
            )
        ),
        step_started=step.on_conflict_do_update(
            index_elements=[saga_steps.c.request_id, saga_steps.c.idx],
            set_=_restart_step(step.excluded),
        ),
        step_finished=update(saga_steps)
        .where(saga_steps.c.request_id == ended.c.id, saga_steps.c.idx == ended.c.idx)
        .values(state=ended.c.state, finished_at=ended.c.at, error=ended.c.error, data=ended.c.data)
        .returning(saga_steps.c.request_id, saga_steps.c.idx),
        heartbeat=beat.on_conflict_do_update(
            index_elements=[replicas.c.owner], set_={"heartbeat_at": beat.excluded.heartbeat_at}
        ),
    )


# --- the SQLite writer ----------------------------------------------------------------------------
#
# On SQLite, SQLAlchemy's async layer costs more than the writes themselves: every statement is
# a greenlet switch and a trip to aiosqlite's thread and back. A thread of our own fared little
# better: each statement releases the GIL, and getting it back meant waiting for the busy loop.
# So the writer applies its batches on the loop, with a few prepared statements per op (sqlite3
# caches them) between BEGIN and COMMIT. Without an fsync per commit that is cheaper than any
# handoff, and the loop never waits for a lock (busy_timeout 0) or a checkpoint (another
# connection runs those). Ops run in queue order, so a saga's writes keep their order without
# rounds.

_SQLITE_BEGIN: Final = (
    "INSERT INTO sagas (request_id, facade, kind, state, payload, payload_hash, data, owner,"
    " error_code, error_reason, created_at, updated_at)"
    " VALUES (?, ?, ?, 'RUNNING', ?, ?, '', ?, '', '', ?, ?)"
    " ON CONFLICT (request_id) DO NOTHING"
)
_SQLITE_SAGA_UPDATE: Final = (
    # NULL state or data keeps it; an empty error keeps the one recorded earlier.
    "UPDATE sagas SET state = coalesce(?1, state), data = coalesce(?2, data),"
    " data_at = CASE WHEN ?2 IS NULL THEN data_at ELSE ?5 END,"
    " error_code = CASE ?3 WHEN '' THEN error_code ELSE ?3 END,"
    " error_reason = CASE ?4 WHEN '' THEN error_reason ELSE ?4 END,"
    " updated_at = ?5 WHERE request_id = ?6"
)
_SQLITE_STEP_STARTED: Final = (
    "INSERT INTO saga_steps (request_id, idx, name, state, attempts, started_at, finished_at,"
    " error) VALUES (?, ?, ?, 'RUNNING', 1, ?, NULL, '')"
    " ON CONFLICT (request_id, idx) DO UPDATE SET name = excluded.name, state = 'RUNNING',"
    " attempts = saga_steps.attempts + 1, started_at = excluded.started_at,"
    " finished_at = NULL, error = '', data = NULL"
)
_SQLITE_STEP_FINISHED: Final = (
    "UPDATE saga_steps SET state = ?, finished_at = ?, error = ?, data = ?"
    " WHERE request_id = ? AND idx = ?"
)
_SQLITE_ORPHANS: Final = (
    "SELECT sagas.request_id, sagas.owner FROM sagas"
    " LEFT OUTER JOIN replicas ON replicas.owner = sagas.owner"
    f" WHERE ({_RUNNING_ONLY}) AND sagas.kind = ? AND sagas.owner != ?"
    " AND (replicas.owner IS NULL OR replicas.heartbeat_at < ?)"
    " ORDER BY sagas.created_at LIMIT ?"
)
_SQLITE_CLAIM: Final = "UPDATE sagas SET owner = ?, updated_at = ? WHERE request_id = ?"
_SQLITE_HEARTBEAT: Final = (
    "INSERT INTO replicas (owner, heartbeat_at) VALUES (?, ?)"
    " ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
)


def _sqlite_time(at: datetime) -> str:
    """`at` as `_UtcDateTime` keeps it on SQLite: naive UTC text, fixed width."""
    return at.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


@dataclass(slots=True)
class _Written:
    """What the SQLite writer did with one batch, for the loop to hand out."""

    outcomes: list[tuple[_Op, object]]
    """Each op with its outcome, or the exception its caller gets."""
    transactions: int = 0
    failed: int = 0


class _Busy(Exception):
    """Another connection holds SQLite's write lock: the batch is tried again shortly."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _SqliteWriter:
    """The writing connection to a SQLite file, used on the event loop itself.

    Writes queued while the loop runs are applied in one transaction at its
    next turn, and their callers resolved right after the commit. Commits are
    paced, one per `commit_interval` at most, so that under load each shares
    its pages and WAL frames among more writes, while a write after a quiet
    spell commits at once. In WAL mode with synchronous=NORMAL a commit
    writes to the OS's page cache and does not fsync, so a batch costs the
    loop tens of microseconds: less than handing it to a thread, whose every
    statement waited for the busy loop to let go of the GIL.

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
        *,
        max_batch: int,
        commit_interval: float,
        checkpoint_interval: float,
        lock_timeout: float,
    ) -> None:
        self._path = path
        self._max_batch = max_batch
        self._commit_interval = commit_interval
        self._checkpoint_interval = checkpoint_interval
        self._lock_timeout = lock_timeout
        self._pending: list[_Op] = []
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
        self.on_written: Callable[[_Written], None] = lambda written: None
        """Called with each batch's outcomes, right after its transaction."""

    async def open(self) -> None:
        """Connect both connections (the file exists in WAL mode: the schema was made)."""
        loop = self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._drained.set()
        self._last_checkpoint = loop.time()
        # isolation_level None: no implicit transactions, we BEGIN IMMEDIATE ourselves.
        conn = sqlite3.connect(self._path, timeout=0, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")  # see _sqlite_pragmas
            conn.execute("PRAGMA wal_autocheckpoint=0")  # it would fsync on the loop
            self._checkpointer = await aiosqlite.connect(self._path, isolation_level=None)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def submit(self, op: _Op) -> None:
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
        written = _Written([])
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
                    self.on_written(written)
                return
            written.failed += 1
            written.outcomes += [(op, busy.error) for op in ops[done:]]
        except Exception as exc:
            # A bug, not the database: this batch's callers get it, the writer goes on
            # (a stuck writer would leave every caller waiting).
            log.exception("saga store writer failed on a batch")
            written = _Written([(op, exc) for op in ops], failed=1)
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
        self.on_written(written)

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
            log.warning("saga store checkpoint failed: %s", _brief(exc))
        finally:
            self._holding = False
            self._last_checkpoint = self._loop.time()
            self._checkpointing = None
            if self._pending:
                self._schedule_flush(0)
            else:
                self._drained.set()

    def _write(self, ops: Sequence[_Op], written: _Written) -> None:
        """Apply `ops` in one transaction, splitting it when one op may have spoiled it."""
        try:
            outcomes = self._apply(ops)
        except _BatchFailed as failed:
            written.failed += 1
            if failed.isolate and len(ops) > 1:
                # As SqlSagaStore._write_batch: halves, in order, until the bad op is alone.
                log.warning(
                    "saga store batch of %d writes failed (%s); retrying in halves",
                    len(ops),
                    _brief(failed.cause),
                )
                middle = len(ops) // 2
                self._write(ops[:middle], written)
                self._write(ops[middle:], written)
                return
            written.outcomes += [(op, failed.cause) for op in ops]
            return
        written.transactions += 1
        written.outcomes += [(op, outcomes[op]) for op in ops]

    def _apply(self, ops: Sequence[_Op]) -> dict[_Op, object]:
        conn = self._conn
        if conn is None:
            raise _BatchFailed(RuntimeError("the SQLite writer is closed"), isolate=False)
        try:
            # The write lock up front; without it, nothing was done.
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            error = DBAPIError.instance(None, None, exc, sqlite3.Error, hide_parameters=True)
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
                raise _Busy(error) from exc
            raise _BatchFailed(error, isolate=False) from exc
        stage = "execute"
        try:
            outcomes = {op: _apply_sqlite_op(conn, op) for op in ops}
            stage = "commit"
            conn.execute("COMMIT")
            return outcomes
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            # Callers see the errors SQLAlchemy would raise (IntegrityError, OperationalError),
            # whichever backend. As in _transaction: only a failed statement may be one op's
            # fault.
            error = DBAPIError.instance(None, None, exc, sqlite3.Error, hide_parameters=True)
            raise _BatchFailed(error, isolate=stage == "execute") from exc
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise


def _apply_sqlite_op(conn: sqlite3.Connection, op: _Op) -> object:
    """Apply one op inside the writer's transaction and return its outcome."""
    at = _sqlite_time(op.at)
    if isinstance(op, _Begin):
        created = (
            conn.execute(
                _SQLITE_BEGIN,
                (op.request_id, op.facade, op.kind, op.payload, op.payload_hash, op.owner, at, at),
            ).rowcount
            == 1
        )
        if created and op.first_step:
            conn.execute(_SQLITE_STEP_STARTED, (op.request_id, 0, op.first_step, at))
        return created
    if isinstance(op, _SagaUpdate):
        if op.touches_saga:
            row = op.saga_row()
            touched = conn.execute(
                _SQLITE_SAGA_UPDATE,
                (row["b_state"], row["b_data"], row["b_code"], row["b_reason"], at, op.request_id),
            ).rowcount
            if touched == 0:
                return KeyError(op.request_id)
        if isinstance(op, _StepStarted):
            conn.execute(_SQLITE_STEP_STARTED, (op.request_id, op.index, op.name, at))
        elif isinstance(op, _StepFinished):
            ended = conn.execute(
                _SQLITE_STEP_FINISHED, (op.state, at, op.error, op.data, op.request_id, op.index)
            ).rowcount
            if ended == 0 and not op.touches_saga:
                # No such step (so far the saga row was not touched): unknown saga, or a
                # step never started.
                return KeyError(op.request_id)
            if op.next_step:
                conn.execute(_SQLITE_STEP_STARTED, (op.request_id, op.index + 1, op.next_step, at))
        return None
    if isinstance(op, _Heartbeat):
        conn.execute(_SQLITE_HEARTBEAT, (op.owner, at))
        return None
    if isinstance(op, _Claim):
        candidates = conn.execute(
            _SQLITE_ORPHANS, (op.kind, op.owner, _sqlite_time(op.cutoff), CLAIM_BATCH)
        ).fetchall()
        # The write lock is ours: no other claimer can take these between the two statements.
        claimed = [request_id for request_id, _old_owner in candidates]
        conn.executemany(_SQLITE_CLAIM, [(op.owner, at, request_id) for request_id in claimed])
        return claimed
    raise TypeError(f"unknown saga store write {op!r}")


# --- reading records ----------------------------------------------------------------------------

_STEP_COLUMNS: Final = (
    saga_steps.c.idx.label("step_idx"),
    saga_steps.c.name.label("step_name"),
    saga_steps.c.state.label("step_state"),
    saga_steps.c.attempts.label("step_attempts"),
    saga_steps.c.started_at.label("step_started_at"),
    saga_steps.c.finished_at.label("step_finished_at"),
    saga_steps.c.error.label("step_error"),
    saga_steps.c.data.label("step_data"),
)


def _records_query(*criteria: ColumnElement[bool], limit: int | None = None) -> Select[Any]:
    """Sagas matching `criteria`, newest first, joined with their steps in one statement.

    One statement is one snapshot: a saga and its steps are always consistent
    without an explicit transaction, and reads take one round trip.
    """
    inner = (
        select(sagas)
        .where(*criteria)
        .order_by(sagas.c.created_at.desc(), sagas.c.request_id.desc())
    )
    if limit is not None:
        inner = inner.limit(limit)
    s = inner.subquery("s")
    return (
        select(s, *_STEP_COLUMNS)
        .select_from(s.outerjoin(saga_steps, saga_steps.c.request_id == s.c.request_id))
        .order_by(s.c.created_at.desc(), s.c.request_id.desc(), saga_steps.c.idx)
    )


def _records(rows: Iterable[Row[Any]]) -> list[SagaRecord]:
    """Fold joined saga/step rows into records, keeping the rows' order."""
    grouped: dict[str, tuple[Row[Any], list[StepRecord], list[str | None]]] = {}
    for row in rows:
        entry = grouped.get(row.request_id)
        if entry is None:
            entry = grouped[row.request_id] = (row, [], [])
        if row.step_idx is not None:
            entry[1].append(
                StepRecord(
                    index=row.step_idx,
                    name=row.step_name,
                    state=StepState(row.step_state),
                    attempts=row.step_attempts,
                    started_at=row.step_started_at,
                    finished_at=row.step_finished_at,
                    error=row.step_error,
                )
            )
            entry[2].append(row.step_data)
    return [_record(row, steps, step_data) for row, steps, step_data in grouped.values()]


def _record(row: Row[Any], steps: list[StepRecord], step_data: list[str | None]) -> SagaRecord:
    """One saga from its row and its steps (in order) with their data.

    Its data: the saga row's once written there (a final write), else that of
    its last finished step. Steps run in order, so their index orders their
    data, whichever replica's clock wrote it. Its updated_at: the latest write
    to the row or to a step.
    """
    data = row.data
    if row.data_at is None:
        data = next((d for d in reversed(step_data) if d is not None), data)
    moments = [row.updated_at]
    for step in steps:
        moments.append(step.started_at)
        if step.finished_at is not None:
            moments.append(step.finished_at)
    return SagaRecord(
        request_id=row.request_id,
        facade=row.facade,
        kind=row.kind,
        state=SagaState(row.state),
        payload=row.payload,
        payload_hash=row.payload_hash,
        data=data,
        owner=row.owner,
        created_at=row.created_at,
        updated_at=max(moments),
        error_code=row.error_code,
        error_reason=row.error_reason,
        steps=tuple(steps),
    )


async def _load(conn: AsyncConnection, request_ids: Iterable[str]) -> dict[str, SagaRecord]:
    ids = list(request_ids)
    if not ids:
        return {}
    result = await conn.execute(_records_query(sagas.c.request_id.in_(ids)))
    return {record.request_id: record for record in _records(result)}


def _claim_order(record: SagaRecord) -> tuple[datetime, str]:
    return record.created_at, record.request_id


def _encode_token(created_at: datetime, request_id: str) -> str:
    raw = json.dumps(
        {"created_at": created_at.isoformat(), "request_id": request_id}, separators=(",", ":")
    )
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        fields = json.loads(raw)
        created_at = datetime.fromisoformat(fields["created_at"])
        request_id = fields["request_id"]
    except (ValueError, TypeError, KeyError) as exc:  # binascii.Error is a ValueError
        raise ValueError("invalid page token") from exc
    if not isinstance(request_id, str) or created_at.tzinfo is None:
        raise ValueError("invalid page token")
    return created_at, request_id


# --- the store ----------------------------------------------------------------------------------


def _brief(exc: BaseException) -> str:
    """The driver's complaint, without the statement SQLAlchemy wraps around it."""
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"


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


def _add_missing_columns(conn: Connection) -> None:
    """Bring tables an earlier version created up to date: add the nullable columns they lack.

    (create_all creates missing tables, never missing columns.) A missing column
    that cannot be NULL needs a migration of its own: that is an error here.
    """
    inspector = inspect(conn)
    for table in metadata.sorted_tables:
        present = {found["name"] for found in inspector.get_columns(table.name)}
        for wanted in table.columns:
            if wanted.name in present:
                continue
            if not wanted.nullable:
                raise RuntimeError(
                    f"saga store table {table.name!r} has no column {wanted.name!r}, which "
                    "cannot be added on its own: migrate the database or start a new one"
                )
            kind = wanted.type.compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {wanted.name} {kind}"))
            log.info("saga store schema: added column %s.%s", table.name, wanted.name)


class SqlSagaStore(SagaStore):
    """Sagas in SQLite or PostgreSQL, written through a group-commit writer."""

    def __init__(
        self, url: str, *, max_batch: int = MAX_BATCH, commit_interval: float | None = None
    ) -> None:
        """`max_batch` caps the writes per transaction (1 turns group commit off);
        `commit_interval` paces commits, at most one per so many seconds (None: the
        backend's default, `SQLITE_COMMIT_INTERVAL` on SQLite and none on PostgreSQL)."""
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
        self._queue: list[_Op] = []
        self._wake = asyncio.Event()
        self._last_commit = 0.0
        self._writer: asyncio.Task[None] | None = None
        self._sqlite_writer: _SqliteWriter | None = None
        self._closing = False
        self.stats = WriterStats()
        self._build_statements()

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._url.render_as_string(hide_password=True)

    def _build_statements(self) -> None:
        # PostgreSQL's; SQLite's writes go through _SqliteWriter.
        self._batch = _postgres_batch_statements()
        self._exists_query = select(sagas.c.request_id).where(
            sagas.c.request_id.in_(bindparam("b_ids", expanding=True))
        )
        self._get_query = _records_query(sagas.c.request_id == bindparam("b_id"))
        self._orphans_query = (
            select(sagas.c.request_id, sagas.c.owner)
            .select_from(sagas.outerjoin(replicas, replicas.c.owner == sagas.c.owner))
            .where(
                text(_RUNNING_ONLY).self_group(),
                sagas.c.kind == bindparam("b_kind"),
                sagas.c.owner != bindparam("b_me"),
                (replicas.c.owner.is_(None)) | (replicas.c.heartbeat_at < bindparam("b_cutoff")),
            )
            .order_by(sagas.c.created_at)
            .limit(CLAIM_BATCH)
        )
        self._claim_stmt = (
            update(sagas)
            .where(
                sagas.c.request_id == bindparam("b_id"),
                sagas.c.owner == bindparam("b_old"),
                sagas.c.state == SagaState.RUNNING.value,
            )
            .values(owner=bindparam("b_me"), updated_at=bindparam("b_at"))
        )

    # --- lifecycle ---

    async def start(self) -> None:
        """Create the schema if missing and start the writer."""
        if self._writer is not None or self._sqlite_writer is not None:
            return
        await self._create_schema()
        self._closing = False
        if self._sqlite:
            writer = _SqliteWriter(
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

    async def _create_schema(self) -> None:
        for attempt in range(3):
            try:
                async with self._writing() as conn:
                    if not self._sqlite:
                        # Replicas starting together queue here, so only the first creates
                        # the tables; the rest find them. (SQLite's BEGIN IMMEDIATE does
                        # the same.)
                        await conn.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY}
                        )
                    await conn.run_sync(metadata.create_all)
                    await conn.run_sync(_add_missing_columns)
                return
            except (ProgrammingError, IntegrityError):
                # Someone not holding our lock (another version, a migration tool) created
                # a table between create_all's check and its CREATE: check again.
                if attempt == 2:
                    raise
                log.info("saga store schema created concurrently; checking again")

    async def _begin_write(self, conn: AsyncConnection) -> None:
        """Begin a writing transaction on `conn`."""
        await conn.begin()
        if self._sqlite:
            # Take the write lock up front, waiting up to busy_timeout for it: a deferred
            # BEGIN that reads, then writes, fails at once with SQLITE_BUSY when another
            # connection wrote in between. Sent straight to the aiosqlite connection:
            # one trip to its thread instead of a cursor's three. SQLAlchemy's commit
            # and rollback end it.
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
        """Apply every queued write, stop the writer and disconnect."""
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

    def _submit(self, op: _Op) -> asyncio.Future[Any]:
        if self._closing or (self._writer is None and self._sqlite_writer is None):
            raise RuntimeError("the saga store is not running (start() it; is it closed?)")
        if self._sqlite_writer is not None:
            self._sqlite_writer.submit(op)
            return op.future
        self._queue.append(op)
        self._wake.set()
        return op.future

    def _written(self, written: _Written) -> None:
        """Hand the SQLite writer's outcomes to their callers (on the loop)."""
        self.stats.ops += len(written.outcomes)
        self.stats.transactions += written.transactions
        self.stats.failed_batches += written.failed
        self.stats.largest_batch = max(self.stats.largest_batch, len(written.outcomes))
        for op, outcome in written.outcomes:
            if op.future.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(outcome, BaseException):
                op.future.set_exception(outcome)
            else:
                op.future.set_result(outcome)

    async def begin(
        self,
        *,
        request_id: str,
        facade: str,
        kind: str,
        payload: str,
        payload_hash: str,
        owner: str,
        first_step: str = "",
    ) -> BeginResult:
        """Record a new RUNNING saga (and its first step), unless one exists under
        `request_id`: then return that one."""
        op = _Begin(
            _now(),
            asyncio.get_running_loop().create_future(),
            request_id,
            facade,
            kind,
            payload,
            payload_hash,
            owner,
            first_step,
        )
        if await self._submit(op):
            return BeginResult(created=True)
        # Committed before our INSERT found it, and sagas are never deleted: it is there.
        existing = await self.get(request_id)
        if existing is None:
            raise RuntimeError(f"saga {request_id!r} was there to conflict with, then gone")
        return BeginResult(created=False, existing=existing)

    async def step_started(self, request_id: str, index: int, name: str) -> None:
        """Record an attempt of step `index`; KeyError if the saga is unknown."""
        loop = asyncio.get_running_loop()
        await self._submit(_StepStarted(_now(), loop.create_future(), request_id, index, name))

    async def step_finished(
        self,
        request_id: str,
        index: int,
        *,
        state: StepState,
        data: str,
        error: str = "",
        next_step: str = "",
        saga_state: SagaState | None = None,
        error_code: str = "",
        error_reason: str = "",
    ) -> None:
        """Record how step `index` ended and the saga's data, then the next step's start or
        the saga's new state, in one write; KeyError if the saga is unknown."""
        loop = asyncio.get_running_loop()
        await self._submit(
            _StepFinished(
                _now(),
                loop.create_future(),
                request_id,
                index,
                str(state),
                data,
                error,
                next_step,
                None if saga_state is None else str(saga_state),
                error_code,
                error_reason,
            )
        )

    async def set_state(
        self,
        request_id: str,
        state: SagaState,
        *,
        data: str | None = None,
        error_code: str = "",
        error_reason: str = "",
    ) -> None:
        """Move the saga to `state`; data None and empty errors keep what is recorded."""
        loop = asyncio.get_running_loop()
        await self._submit(
            _SetState(
                _now(),
                loop.create_future(),
                request_id,
                str(state),
                data,
                error_code,
                error_reason,
            )
        )

    async def heartbeat(self, owner: str) -> None:
        """Record that replica `owner` is alive now."""
        loop = asyncio.get_running_loop()
        await self._submit(_Heartbeat(_now(), loop.create_future(), owner))

    # --- the writer ---

    async def _write_loop(self) -> None:
        batch: list[_Op] = []
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

    async def _write_batch(self, ops: Sequence[_Op]) -> None:
        """Apply `ops` in one transaction, splitting it when one op may have spoiled it."""
        try:
            outcomes = await self._transaction(ops)
        except _BatchFailed as failed:
            self.stats.failed_batches += 1
            if failed.isolate and len(ops) > 1:
                # A statement failed: maybe one op's data (a NOT NULL, a too-long id), maybe
                # a deadlock. Everything was rolled back, so retry the halves, in order
                # (per-saga order holds), until the bad op is alone: log2(n) extra
                # transactions per bad op, and the good ops commit.
                log.warning(
                    "saga store batch of %d writes failed (%s); retrying in halves",
                    len(ops),
                    _brief(failed.cause),
                )
                middle = len(ops) // 2
                await self._write_batch(ops[:middle])
                await self._write_batch(ops[middle:])
                return
            for op in ops:
                if not op.future.done():
                    op.future.set_exception(failed.cause)
            return
        self.stats.ops += len(ops)
        self.stats.transactions += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(ops))
        for op in ops:
            if op.future.done():  # its caller was cancelled meanwhile
                continue
            outcome = outcomes.get(op)
            if isinstance(outcome, BaseException):
                op.future.set_exception(outcome)
            else:
                op.future.set_result(outcome)

    async def _transaction(self, ops: Sequence[_Op]) -> dict[_Op, object]:
        """Apply `ops` in one transaction and return each op's outcome once committed."""
        stage = "connect"
        try:
            async with self._engine.connect() as conn:
                await self._begin_write(conn)
                stage = "execute"
                outcomes = await self._apply(conn, ops)
                stage = "commit"
                await conn.commit()
                return outcomes
        except Exception as exc:
            lost = isinstance(exc, DBAPIError) and exc.connection_invalidated
            # Only a failed statement may be one op's fault. No connection, no write lock
            # (SQLite busy past busy_timeout) or a lost connection fail the whole batch:
            # retrying op by op would multiply the wait for nothing. A failed COMMIT is
            # not retried either: it may have committed, and step_started is not
            # idempotent (attempts would count twice).
            raise _BatchFailed(exc, isolate=stage == "execute" and not lost) from exc

    async def _apply(self, conn: AsyncConnection, ops: Sequence[_Op]) -> dict[_Op, object]:
        outcomes: dict[_Op, object] = {}
        for round_ops in _rounds(ops):
            await self._apply_round(conn, round_ops, outcomes)
        return outcomes

    async def _many(
        self, conn: AsyncConnection, statement: Executable, rows: list[dict[str, Any]]
    ) -> CursorResult[Any]:
        """Run a batch statement over `rows`: one array per column (see `_BatchStatements`)."""
        return await conn.execute(statement, {key: [row[key] for row in rows] for key in rows[0]})

    async def _apply_round(
        self, conn: AsyncConnection, ops: list[_Op], outcomes: dict[_Op, object]
    ) -> None:
        """One statement per kind of write, whatever the number of ops, rows sorted by key.

        The sort gives concurrent PostgreSQL writers one lock order, which keeps
        them from deadlocking on the rows they share (two replicas beginning the
        same request ids).
        """
        started: list[dict[str, Any]] = []
        begins = sorted((op for op in ops if isinstance(op, _Begin)), key=lambda op: op.key)
        if begins:
            result = await self._many(conn, self._batch.begin, [op.row() for op in begins])
            created = set(result.scalars())
            for begin in begins:
                outcomes[begin] = begin.request_id in created
            started += [b.first_step_row() for b in begins if outcomes[b] and b.first_step]

        updates = sorted((op for op in ops if isinstance(op, _SagaUpdate)), key=lambda op: op.key)
        outcomes.update(dict.fromkeys(updates))
        saga_rows = [op for op in updates if op.touches_saga]
        missing: set[str] = set()
        if saga_rows:
            result = await self._many(
                conn, self._batch.saga_update, [op.saga_row() for op in saga_rows]
            )
            # Each op's saga row is a distinct row here, so a short count means a write to
            # a saga nobody began: find which, and fail those alone (KeyError, as in the
            # in-memory store). Sagas are never deleted, so this stays true until commit.
            if result.rowcount != len(saga_rows):
                ids = sorted({op.request_id for op in saga_rows})
                found = await conn.execute(self._exists_query, {"b_ids": ids})
                missing = set(ids) - set(found.scalars())
        for op in saga_rows:
            if op.request_id in missing:
                outcomes[op] = KeyError(op.request_id)
        known = [op for op in updates if outcomes[op] is None]

        # A step's end before the next one's start: they are different rows, but a
        # finished step and a restarted one of one saga never share a round anyway.
        ends = [op for op in known if isinstance(op, _StepFinished)]
        if ends:
            result = await self._many(
                conn, self._batch.step_finished, [op.step_row() for op in ends]
            )
            found_steps = {tuple(row) for row in result}
            for op in ends:
                # A plain step end touched no saga row: no such step means an unknown saga
                # (or a step never started).
                if not op.touches_saga and (op.request_id, op.index) not in found_steps:
                    outcomes[op] = KeyError(op.request_id)
            known = [op for op in known if outcomes[op] is None]
        started += [op.step_row() for op in known if isinstance(op, _StepStarted)]
        started += [
            op.next_step_row() for op in known if isinstance(op, _StepFinished) and op.next_step
        ]
        if started:
            started.sort(key=lambda row: (row["b_id"], row["b_idx"]))
            await self._many(conn, self._batch.step_started, started)

        beats = sorted((op for op in ops if isinstance(op, _Heartbeat)), key=lambda op: op.key)
        if beats:
            await self._many(
                conn, self._batch.heartbeat, [{"b_owner": op.owner, "b_at": op.at} for op in beats]
            )
            outcomes.update(dict.fromkeys(beats))

    # --- reads and claims, straight to the engine ---

    async def get(self, request_id: str) -> SagaRecord | None:
        """The saga with its steps in order, or None."""
        async with self._engine.connect() as conn:
            result = await conn.execute(self._get_query, {"b_id": request_id})
            records = _records(result)
        return records[0] if records else None

    async def list_sagas(
        self,
        *,
        facade: str = "",
        state: SagaState | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> SagaPage:
        """Newest first, with steps; `page_size` is clamped to 1..500; a bad token: ValueError."""
        page_size = max(1, min(page_size, MAX_PAGE_SIZE))
        criteria: list[ColumnElement[bool]] = []
        if facade:
            criteria.append(sagas.c.facade == facade)
        if state is not None:
            criteria.append(sagas.c.state == str(state))
        if page_token:
            after_at, after_id = _decode_token(page_token)
            criteria.append(tuple_(sagas.c.created_at, sagas.c.request_id) < (after_at, after_id))
        # One more than the page says whether there is a next one.
        query = _records_query(*criteria, limit=page_size + 1)
        async with self._engine.connect() as conn:
            records = _records(await conn.execute(query))
        page = records[:page_size]
        token = ""
        if len(records) > page_size:
            token = _encode_token(page[-1].created_at, page[-1].request_id)
        return SagaPage(sagas=page, next_page_token=token)

    async def claim_orphans(self, owner: str, *, stale_after: float, kind: str) -> list[SagaRecord]:
        """Take over up to 100 RUNNING sagas of `kind` whose replica's heartbeat is stale or
        missing; each goes to exactly one claimer, thanks to a compare-and-set on its owner."""
        now = _now()
        cutoff = now - timedelta(seconds=stale_after)
        if self._sqlite:
            # Taken by the writer, inside one of its transactions: a claim holding the
            # write lock across trips to another connection's thread would stall it.
            loop = asyncio.get_running_loop()
            claimed_ids: list[str] = await self._submit(
                _Claim(now, loop.create_future(), owner, cutoff, kind)
            )
            async with self._engine.connect() as conn:
                loaded = await _load(conn, claimed_ids)
            return sorted(loaded.values(), key=_claim_order)
        async with self._writing() as conn:
            candidates = await conn.execute(
                self._orphans_query, {"b_kind": kind, "b_me": owner, "b_cutoff": cutoff}
            )
            claimed: list[str] = []
            # Sorted, so concurrent claimers lock rows in one order and never deadlock; a
            # claimer that loses the race waits for the winner's commit, then misses.
            for request_id, old_owner in sorted(candidates.all()):
                result = await conn.execute(
                    self._claim_stmt,
                    {"b_id": request_id, "b_old": old_owner, "b_me": owner, "b_at": now},
                )
                if result.rowcount == 1:
                    claimed.append(request_id)
            records = await _load(conn, claimed)
        return sorted(records.values(), key=_claim_order)

    async def __aenter__(self) -> SqlSagaStore:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
