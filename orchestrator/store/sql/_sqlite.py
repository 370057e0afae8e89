"""The SQLite side of the SQL store: its writer and its point reads, both on the event loop.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import aiosqlite
from sqlalchemy.exc import DBAPIError

from orchestrator.store.base import CLAIM_BATCH
from orchestrator.store.changes import (
    CompensationEnded,
    StepEnded,
    StepFailed,
    StepPending,
    StepRestarted,
)
from orchestrator.store.records import Position, SagaRecord, SagaState
from orchestrator.store.sql._operator import run_sqlite
from orchestrator.store.sql._ops import (
    ApplyOp,
    BatchFailed,
    BeginOp,
    ClaimOp,
    HeartbeatOp,
    JournalBroken,
    Op,
    OperatorOp,
)
from orchestrator.store.sql._records import POSITION, SQLITE_GET, position, records
from orchestrator.store.sql._schema import IN_PROCESS_ONLY, OPEN_ONLY, RUNNING_ONLY, sqlite_time

__all__ = ["SqliteWriter", "Written"]

log = logging.getLogger("orchestrator.store.sql")

_KEY: Final = "facade = ? AND request_id = ?"
_POSITION: Final = POSITION.format("?", "?")
_BEGIN: Final = (
    "INSERT INTO sagas (facade, request_id, kind, state, payload, payload_hash, data, owner,"
    " error_code, error_reason, created_at, updated_at, deadline_at)"
    " VALUES (?, ?, ?, 'RUNNING', ?, ?, '', ?, '', '', ?, ?, ?)"
    " ON CONFLICT (facade, request_id) DO NOTHING"
)
_STEP_START: Final = (
    "INSERT INTO saga_steps (facade, request_id, idx, name, state, attempts, started_at, error,"
    " compensation, compensation_error) VALUES (?, ?, ?, ?, 'RUNNING', 1, ?, '', '', '')"
)
_STEP_RESTARTED: Final = (
    "UPDATE saga_steps SET state = 'RUNNING', attempts = attempts + 1, started_at = ?,"
    " finished_at = NULL, error = '', data = NULL"
    f" WHERE {_KEY} AND idx = ? AND state IN ('RUNNING', 'PENDING')"
)
_STEP_PENDING: Final = (
    f"UPDATE saga_steps SET state = 'PENDING', error = ? WHERE {_KEY} AND idx = ?"
    " AND state = 'RUNNING'"
)
_STEP_DONE: Final = (
    "UPDATE saga_steps SET state = 'DONE', finished_at = ?, data = ?"
    f" WHERE {_KEY} AND idx = ? AND state = 'RUNNING'"
)
_STEP_FAILED: Final = (
    "UPDATE saga_steps SET state = 'FAILED', finished_at = ?, error = ?, data = coalesce(?, data)"
    f" WHERE {_KEY} AND idx = ? AND state IN ('RUNNING', 'PENDING')"
)
_TOUCH: Final = f"UPDATE sagas SET updated_at = ? WHERE {_KEY}"
_COMPLETE: Final = (
    "UPDATE sagas SET state = 'COMPLETED', deadline_at = NULL, updated_at = ?"
    f" WHERE {_KEY} AND state = 'RUNNING'"
)
_FAIL: Final = (
    "UPDATE sagas SET state = ?, error_code = ?, error_reason = ?, deadline_at = ?,"
    f" updated_at = ? WHERE {_KEY} AND state = 'RUNNING'"
)
_UNDO: Final = f"UPDATE saga_steps SET compensation = 'PENDING' WHERE {_KEY} AND idx = ?"
_COMPENSATION_ENDED: Final = (
    "UPDATE sagas SET state = ?1, deadline_at = NULL, updated_at = ?2,"
    " error_reason = CASE ?3 WHEN '' THEN error_reason ELSE ?3 END"
    " WHERE facade = ?4 AND request_id = ?5 AND state = 'COMPENSATING'"
)
_UNDONE: Final = (
    f"UPDATE saga_steps SET compensation = 'DONE', compensated_at = ? WHERE {_KEY} AND idx = ?"
)
_UNDO_FAILED: Final = (
    "UPDATE saga_steps SET compensation = 'FAILED', compensated_at = ?, compensation_error = ?"
    f" WHERE {_KEY} AND idx = ?"
)
_HEARTBEAT: Final = (
    "INSERT INTO replicas (owner, heartbeat_at) VALUES (?, ?)"
    " ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
)
_ORPHANS: Final = (
    "SELECT sagas.facade, sagas.request_id FROM sagas"
    " LEFT OUTER JOIN replicas ON replicas.owner = sagas.owner"
    f" WHERE ({RUNNING_ONLY}) AND sagas.{IN_PROCESS_ONLY} AND sagas.owner != ?"
    " AND (replicas.owner IS NULL OR replicas.heartbeat_at < ?)"
    " ORDER BY sagas.created_at LIMIT ?"
)
_EXPIRED: Final = (
    f"SELECT facade, request_id FROM sagas WHERE ({OPEN_ONLY}) AND deadline_at < ?"
    " ORDER BY deadline_at LIMIT ?"
)
_CLAIM: Final = f"UPDATE sagas SET owner = ?, deadline_at = ?, updated_at = ? WHERE {_KEY}"


@dataclass(slots=True)
class Written:
    """What the SQLite writer did with one batch, for the loop to hand out."""

    outcomes: list[tuple[Op, object]]
    """Each op with its outcome, or the exception its caller gets."""
    transactions: int = 0
    failed: int = 0


class _Busy(Exception):
    """Another connection holds SQLite's write lock: the batch is tried again shortly."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class SqliteWriter:
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
        self.on_written: Callable[[Written], None] = lambda written: None
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
            conn.execute("PRAGMA synchronous=NORMAL")  # see the store's pragmas
            conn.execute("PRAGMA wal_autocheckpoint=0")  # it would fsync on the loop
            self._checkpointer = await aiosqlite.connect(self._path, isolation_level=None)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def get(self, facade: str, request_id: str) -> SagaRecord | None:
        """The saga, read on the loop from the committed state (between batches)."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("the SQLite store is closed")
        try:
            rows = conn.execute(SQLITE_GET, (facade, request_id)).fetchall()
        except sqlite3.Error as exc:
            raise DBAPIError.instance(None, None, exc, sqlite3.Error, hide_parameters=True) from exc
        found = records(rows)
        return found[0] if found else None

    def position(self, facade: str, request_id: str) -> Position | None:
        """Where the saga stands, read on the loop from the committed state (between batches)."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("the SQLite store is closed")
        try:
            rows = conn.execute(_POSITION, (facade, request_id)).fetchall()
        except sqlite3.Error as exc:
            raise DBAPIError.instance(None, None, exc, sqlite3.Error, hide_parameters=True) from exc
        return position(rows)

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
        written = Written([])
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
        """Apply `ops` in one transaction, splitting it when one op may have spoiled it."""
        try:
            outcomes = self._apply(ops)
        except BatchFailed as failed:
            written.failed += 1
            if failed.isolate and len(ops) > 1:
                # Everything was rolled back: retry the halves, in order (a saga's ops keep
                # their order), until the bad op is alone and the good ones commit.
                log.warning(
                    "saga store batch of %d writes failed (%s); retrying in halves",
                    len(ops),
                    brief(failed.cause),
                )
                middle = len(ops) // 2
                self._write(ops[:middle], written)
                self._write(ops[middle:], written)
                return
            written.outcomes += [(op, failed.cause) for op in ops]
            return
        written.transactions += 1
        written.outcomes += [(op, outcomes[op]) for op in ops]

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
            outcomes = {op: _apply_op(conn, op, at) for op in ops}
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


def _apply_op(conn: sqlite3.Connection, op: Op, at: str) -> object:
    """Apply one op inside the writer's transaction, at time `at`; return its outcome."""
    if isinstance(op, ApplyOp):
        return _apply_change(conn, op, at)
    if isinstance(op, BeginOp):
        saga = op.saga
        deadline = None if saga.deadline_at is None else sqlite_time(saga.deadline_at)
        created = (
            conn.execute(
                _BEGIN,
                (
                    saga.facade,
                    saga.request_id,
                    saga.kind,
                    saga.payload,
                    saga.payload_hash,
                    saga.owner,
                    at,
                    at,
                    deadline,
                ),
            ).rowcount
            == 1
        )
        if created:
            conn.execute(_STEP_START, (saga.facade, saga.request_id, 0, saga.first_step, at))
        return created
    if isinstance(op, HeartbeatOp):
        conn.execute(_HEARTBEAT, (op.owner, at))
        return None
    if isinstance(op, ClaimOp):
        # The write lock is ours: no other claimer can take these between the statements.
        claimed: dict[tuple[str, str], bool] = {}
        for facade, request_id in conn.execute(_EXPIRED, (at, CLAIM_BATCH)):
            claimed[facade, request_id] = True
        stale = sqlite_time(op.stale_before)
        for facade, request_id in conn.execute(_ORPHANS, (op.owner, stale, CLAIM_BATCH)):
            claimed.setdefault((facade, request_id), False)
        taken = list(claimed.items())[:CLAIM_BATCH]
        hold = sqlite_time(op.hold_until)
        conn.executemany(_CLAIM, [(op.owner, hold, at, *key) for key, _ in taken])
        return taken
    if isinstance(op, OperatorOp):
        return run_sqlite(conn, op, at, lambda change: _apply_change(conn, change, at))
    raise TypeError(f"unknown saga store write {op!r}")


def _apply_change(conn: sqlite3.Connection, op: ApplyOp, at: str) -> bool:
    """One compare-and-set: the current step's row decides, the saga's row follows."""
    key = (op.facade, op.request_id)
    change = op.change
    if isinstance(change, CompensationEnded):
        moved = conn.execute(
            _COMPENSATION_ENDED, (str(change.state), at, ended_reason(change), *key)
        ).rowcount
        if not moved:
            return False
        conn.executemany(_UNDONE, [(at, *key, index) for index in change.done])
        if change.failed is not None:
            conn.execute(_UNDO_FAILED, (at, change.error, *key, change.failed))
        return True
    if isinstance(change, StepRestarted):
        return conn.execute(_STEP_RESTARTED, (at, *key, change.index)).rowcount == 1
    if isinstance(change, StepPending):
        if not conn.execute(_STEP_PENDING, (change.reason, *key, change.index)).rowcount:
            return False
        conn.execute(_TOUCH, (at, *key))  # a step's wait has no time of its own
        return True
    if isinstance(change, StepEnded):
        if not conn.execute(_STEP_DONE, (at, change.data, *key, change.index)).rowcount:
            return False
        if change.complete:
            _follows(conn.execute(_COMPLETE, (at, *key)).rowcount, op)
        else:
            conn.execute(_STEP_START, (*key, change.index + 1, change.next_step, at))
        return True
    ended = conn.execute(_STEP_FAILED, (at, change.reason, change.data, *key, change.index))
    if not ended.rowcount:
        return False
    conn.executemany(_UNDO, [(*key, index) for index in change.undo])
    deadline = _deadline(change)
    moved = conn.execute(
        _FAIL, (str(change.then), change.code, change.reason, deadline, at, *key)
    ).rowcount
    _follows(moved, op)
    return True


def _deadline(change: StepFailed) -> str | None:
    """A failed saga's deadline: its compensation's, or none when it ends at once."""
    if change.then != SagaState.COMPENSATING or change.deadline_at is None:
        return None
    return sqlite_time(change.deadline_at)


def ended_reason(change: CompensationEnded) -> str:
    """The saga's new error reason ("" keeps its own): only a failed compensation has one."""
    return change.error if change.state == SagaState.COMPENSATION_FAILED else ""


def _follows(rowcount: int, op: ApplyOp) -> None:
    """The saga's row moves with its current step's; anything else breaks the journal's
    invariant, and the batch must not commit it."""
    if rowcount != 1:
        raise JournalBroken(op.facade, op.request_id)


def brief(exc: BaseException) -> str:
    """The driver's complaint, without the statement SQLAlchemy wraps around it."""
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    text = str(cause)
    return f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"
