"""Applying the SQL store's ops on SQLite: plain statements on the writer's sqlite3 connection.

Each op is a few prepared statements (sqlite3 caches them) inside the
writer's transaction, in queue order, at the transaction's one time `at` (as
`sqlite_time` writes it). Each compare-and-set first updates the row of the
saga's current step (its condition is the step's state); only then does the
saga's row follow. A step's statement finds its saga's number by the saga's
key (`_STEP_KEY`, a subquery SQLite runs once per statement), so its
parameters are the key, as the saga's statements' are.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

from orchestrator.store.base import CLAIM_BATCH
from orchestrator.store.changes import (
    CompensationEnded,
    StepEnded,
    StepFailed,
    StepPending,
    StepRestarted,
)
from orchestrator.store.records import SagaState
from orchestrator.store.sql._operator import Done, Engine, plan
from orchestrator.store.sql._ops import (
    ApplyOp,
    BeginOp,
    ClaimOp,
    HeartbeatOp,
    JournalBroken,
    Op,
    OperatorOp,
    ended_reason,
)
from orchestrator.store.sql._schema import IN_PROCESS_ONLY, OPEN_ONLY, RUNNING_ONLY, sqlite_time

__all__ = ["apply_op"]

_KEY: Final = "facade = ? AND request_id = ?"
_SAGA_NUMBER: Final = f"(SELECT id FROM sagas WHERE {_KEY})"
_STEP_KEY: Final = f"saga_id = {_SAGA_NUMBER}"
_BEGIN: Final = (
    "INSERT INTO sagas (facade, request_id, kind, state, payload, payload_hash, data, owner,"
    " error_code, error_reason, created_at, updated_at, deadline_at)"
    " VALUES (?, ?, ?, 'RUNNING', ?, ?, '', ?, '', '', ?, ?, ?)"
    " ON CONFLICT (facade, request_id) DO NOTHING"
)
_STEP_START: Final = (
    "INSERT INTO saga_steps (saga_id, idx, name, state, attempts, started_at, error,"
    f" compensation, compensation_error) VALUES ({_SAGA_NUMBER}, ?, ?, 'RUNNING', 1, ?, '', '', '')"
)
_STEP_RESTARTED: Final = (
    "UPDATE saga_steps SET state = 'RUNNING', attempts = attempts + 1, started_at = ?,"
    " finished_at = NULL, error = '', data = NULL"
    f" WHERE {_STEP_KEY} AND idx = ? AND state IN ('RUNNING', 'PENDING')"
)
_STEP_PENDING: Final = (
    f"UPDATE saga_steps SET state = 'PENDING', error = ? WHERE {_STEP_KEY} AND idx = ?"
    " AND state = 'RUNNING'"
)
_STEP_DONE: Final = (
    "UPDATE saga_steps SET state = 'DONE', finished_at = ?, data = ?"
    f" WHERE {_STEP_KEY} AND idx = ? AND state = 'RUNNING'"
)
_STEP_FAILED: Final = (
    "UPDATE saga_steps SET state = 'FAILED', finished_at = ?, error = ?, data = coalesce(?, data)"
    f" WHERE {_STEP_KEY} AND idx = ? AND state IN ('RUNNING', 'PENDING')"
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
_UNDO: Final = f"UPDATE saga_steps SET compensation = 'PENDING' WHERE {_STEP_KEY} AND idx = ?"
_COMPENSATION_ENDED: Final = (
    "UPDATE sagas SET state = ?1, deadline_at = NULL, updated_at = ?2,"
    " error_reason = CASE ?3 WHEN '' THEN error_reason ELSE ?3 END"
    " WHERE facade = ?4 AND request_id = ?5 AND state = 'COMPENSATING'"
)
_UNDONE: Final = (
    f"UPDATE saga_steps SET compensation = 'DONE', compensated_at = ? WHERE {_STEP_KEY} AND idx = ?"
)
_UNDO_FAILED: Final = (
    "UPDATE saga_steps SET compensation = 'FAILED', compensated_at = ?, compensation_error = ?"
    f" WHERE {_STEP_KEY} AND idx = ?"
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


def apply_op(conn: sqlite3.Connection, op: Op, at: str) -> object:
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


def _follows(rowcount: int, op: ApplyOp) -> None:
    """The saga's row moves with its current step's; anything else breaks the journal's
    invariant, and the batch must not commit it."""
    if rowcount != 1:
        raise JournalBroken(op.facade, op.request_id)


def run_sqlite(
    conn: sqlite3.Connection, op: OperatorOp, at: str, engine: Callable[[ApplyOp], bool]
) -> object:
    """Carry out `op`'s plan on the SQLite writer's connection, in its transaction at `at`
    (its time as `sqlite_time` wrote it); `engine` applies one of the engine's changes."""
    steps = plan(op, datetime.fromisoformat(at).replace(tzinfo=UTC))
    try:
        step = next(steps)
        while True:
            if isinstance(step, Engine):
                done = Done(int(engine(step.op)))
            else:
                params = {
                    name: sqlite_time(value) if isinstance(value, datetime) else value
                    for name, value in step.params.items()
                }
                cursor = conn.execute(step.sql, params)
                done = Done(cursor.rowcount, cursor.fetchall())
            step = steps.send(done)
    except StopIteration as stop:
        return stop.value
