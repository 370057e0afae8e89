"""The PostgreSQL side of the SQL store: a batch of writes as a few set-based statements.

A batch is split into rounds (one op per saga each, see `rounds`); within a
round, every kind of write is one statement over arrays, one per column:
`UPDATE ... FROM unnest(...)` or `INSERT ... SELECT FROM unnest(...)`. An
executemany would be one server round of parse/bind/execute per row (about
30 us each); one statement costs one execution, and one SQL text for asyncpg's
prepared-statement cache whatever the batch size.

A batch that changed sagas ends with one more statement, `pg_notify` of
their keys (see `_listen`): announced when the transaction commits, never
when it does not. A refused compare-and-set changes nothing and announces
nothing; a heartbeat is no saga's change.

Each compare-and-set first updates the row of the saga's current step (its
condition is the step's state), RETURNING the sagas it matched; only those
go on to their saga row. Every way out of RUNNING ends the current step in the
same transaction, so that row is what concurrent writers queue on. Steps are
keyed by their saga's number: a step's statement joins its keys to `sagas`
for it (`_STEPS_OF`).

Claims and operators' writes (`_operator`) follow a round's statements, one op
at a time.

A batch's transaction runs on the asyncpg connection under the SQLAlchemy
connection the writer checked out of its pool (`_asyncpg`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Final, TypeVar

from orchestrator.store.base import CLAIM_BATCH
from orchestrator.store.changes import (
    CompensationEnded,
    StepEnded,
    StepFailed,
    StepPending,
    StepRestarted,
)
from orchestrator.store.records import SagaState
from orchestrator.store.sql._asyncpg import Connection, Statement, run
from orchestrator.store.sql._listen import CHANNEL, notification_payloads
from orchestrator.store.sql._operator import Done, Engine, plan
from orchestrator.store.sql._ops import (
    ActOp,
    ApplyOp,
    BeginOp,
    ClaimOp,
    HeartbeatOp,
    JournalBroken,
    Op,
    OperatorOp,
    ended_reason,
    rounds,
)
from orchestrator.store.sql._schema import (
    IN_PROCESS_ONLY,
    OPEN_ONLY,
    OPEN_STATES,
    RUNNING_ONLY,
    state_is,
)

__all__ = ["apply_batch", "unnest"]

_Key = tuple[str, str]
_C = TypeVar("_C")


def unnest(prefix: str = "", **columns: str) -> str:
    """`unnest(CAST(:a AS t[]), ...) AS c(a, ...)`: a table from one bound array per column,
    each bound as `:<prefix><column>` (a prefix keeps two such tables of one statement apart)."""
    arrays = ", ".join(f"CAST(:{prefix}{name} AS {kind}[])" for name, kind in columns.items())
    return f"unnest({arrays}) AS c({', '.join(columns)})"


_KEYS: Final = {"f": "text", "r": "text"}
_MATCH: Final = "s.facade = c.f AND s.request_id = c.r"
_STEPS_OF: Final = "JOIN sagas g ON g.facade = c.f AND g.request_id = c.r WHERE s.saga_id = g.id"
"""After `FROM unnest(...)` in an update of `saga_steps s`: the steps of the keys' sagas."""
_STEP_RETURNING: Final = " RETURNING g.facade, g.request_id"

_BEGIN: Final = Statement(
    "INSERT INTO sagas (facade, request_id, kind, state, payload, payload_hash, data, owner,"
    " error_code, error_reason, created_at, updated_at, deadline_at)"
    " SELECT c.f, c.r, c.kind, 'RUNNING', c.payload, c.hash, '', c.owner, '', '', c.at, c.at,"
    " c.deadline FROM "
    + unnest(
        **_KEYS,
        kind="text",
        payload="text",
        hash="text",
        owner="text",
        at="timestamptz",
        deadline="timestamptz",
    )
    + " ON CONFLICT (facade, request_id) DO NOTHING RETURNING facade, request_id"
)
_STEP_START_SQL: Final = (
    "INSERT INTO saga_steps (saga_id, idx, name, state, attempts, started_at, error,"
    " compensation, compensation_error)"
    " SELECT g.id, c.idx, c.name, 'RUNNING', 1, c.at, '', '', '' FROM "
    + unnest(**_KEYS, idx="int", name="text", at="timestamptz")
    + " JOIN sagas g ON g.facade = c.f AND g.request_id = c.r"
)
_STEP_START: Final = Statement(_STEP_START_SQL)
_NOTIFY_SQL: Final = f"SELECT pg_notify('{CHANNEL}', p) FROM unnest(CAST(:payloads AS text[])) AS p"
_STEP_START_AND_NOTIFY: Final = Statement(f"WITH started AS ({_STEP_START_SQL}) {_NOTIFY_SQL}")
"""A round's step starts and the batch's announcement in one round trip: a data-modifying
WITH runs to completion whether or not the query reads it."""
_STEP_RESTARTED: Final = Statement(
    "UPDATE saga_steps s SET state = 'RUNNING', attempts = s.attempts + 1, started_at = c.at,"
    " finished_at = NULL, error = '', data = NULL FROM "
    + unnest(**_KEYS, idx="int", at="timestamptz")
    + f" {_STEPS_OF} AND s.idx = c.idx AND s.state IN ('RUNNING', 'PENDING')"
    + _STEP_RETURNING
)
_STEP_PENDING: Final = Statement(
    "UPDATE saga_steps s SET state = 'PENDING', error = c.reason FROM "
    + unnest(**_KEYS, idx="int", reason="text")
    + f" {_STEPS_OF} AND s.idx = c.idx AND s.state = 'RUNNING'"
    + _STEP_RETURNING
)
_TOUCH: Final = Statement(
    "UPDATE sagas s SET updated_at = c.at FROM "
    + unnest(**_KEYS, at="timestamptz")
    + f" WHERE {_MATCH}"
)
_STEP_DONE: Final = Statement(
    "UPDATE saga_steps s SET state = 'DONE', finished_at = c.at, data = c.data FROM "
    + unnest(**_KEYS, idx="int", at="timestamptz", data="text")
    + f" {_STEPS_OF} AND s.idx = c.idx AND s.state = 'RUNNING'"
    + _STEP_RETURNING
)
_STEP_FAILED: Final = Statement(
    "UPDATE saga_steps s SET state = 'FAILED', finished_at = c.at, error = c.reason,"
    " data = coalesce(c.data, s.data) FROM "
    + unnest(**_KEYS, idx="int", at="timestamptz", reason="text", data="text")
    + f" {_STEPS_OF} AND s.idx = c.idx AND s.state IN ('RUNNING', 'PENDING')"
    + _STEP_RETURNING
)
_COMPLETE: Final = Statement(
    "UPDATE sagas s SET state = 'COMPLETED', deadline_at = NULL, updated_at = c.at FROM "
    + unnest(**_KEYS, at="timestamptz")
    + f" WHERE {_MATCH} AND {state_is('RUNNING', of='s')} RETURNING s.facade, s.request_id"
)
_FAIL: Final = Statement(
    "UPDATE sagas s SET state = c.state, error_code = c.code, error_reason = c.reason,"
    " deadline_at = c.deadline, updated_at = c.at FROM "
    + unnest(
        **_KEYS,
        state="text",
        code="text",
        reason="text",
        deadline="timestamptz",
        at="timestamptz",
    )
    + f" WHERE {_MATCH} AND {state_is('RUNNING', of='s')} RETURNING s.facade, s.request_id"
)
_UNDO: Final = Statement(
    "UPDATE saga_steps s SET compensation = 'PENDING' FROM "
    + unnest(**_KEYS, idx="int")
    + f" {_STEPS_OF} AND s.idx = c.idx"
)
_COMPENSATION_ENDED: Final = Statement(
    "UPDATE sagas s SET state = c.state, deadline_at = NULL, updated_at = c.at,"
    " error_reason = CASE c.error WHEN '' THEN s.error_reason ELSE c.error END FROM "
    + unnest(**_KEYS, state="text", at="timestamptz", error="text")
    + f" WHERE {_MATCH} AND {state_is('COMPENSATING', of='s')}"
    " RETURNING s.facade, s.request_id"
)
_UNDONE: Final = Statement(
    "UPDATE saga_steps s SET compensation = c.state, compensated_at = c.at,"
    " compensation_error = c.error FROM "
    + unnest(**_KEYS, idx="int", state="text", at="timestamptz", error="text")
    + f" {_STEPS_OF} AND s.idx = c.idx"
)
_HEARTBEAT: Final = Statement(
    "INSERT INTO replicas (owner, heartbeat_at) SELECT c.owner, c.at FROM "
    + unnest(owner="text", at="timestamptz")
    + " ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
)
# Claims: the candidates are read first (each kind ordered and limited), then taken by one
# compare-and-set on the owner and deadline each was read with. A concurrent claimer moves
# both, so a row it took no longer matches, and each stalled saga goes to one claimer.
_ORPHANS: Final = Statement(
    "SELECT s.facade, s.request_id, s.owner, s.deadline_at FROM sagas s"
    " LEFT OUTER JOIN replicas r ON r.owner = s.owner"
    f" WHERE ({RUNNING_ONLY}) AND s.{IN_PROCESS_ONLY} AND s.owner != :me"
    " AND (r.owner IS NULL OR r.heartbeat_at < :stale) ORDER BY s.created_at LIMIT :limit"
)
_EXPIRED: Final = Statement(
    "SELECT facade, request_id, owner, deadline_at FROM sagas"
    f" WHERE ({OPEN_ONLY}) AND deadline_at < :now ORDER BY deadline_at LIMIT :limit"
)
_CLAIM: Final = Statement(
    "UPDATE sagas s SET owner = :me, deadline_at = :hold, updated_at = :now FROM "
    + unnest(**_KEYS, owner="text", deadline="timestamptz")
    + f" WHERE {_MATCH} AND s.owner = c.owner AND s.deadline_at IS NOT DISTINCT FROM c.deadline"
    f" AND {state_is(*OPEN_STATES, of='s')} RETURNING s.facade, s.request_id"
)

_NOTIFY: Final = Statement(_NOTIFY_SQL)
"""The announcement on its own, when the batch's last round started no step."""


async def apply_batch(
    conn: Connection, ops: Sequence[Op], *, announce: bool = True
) -> dict[Op, object]:
    """Apply `ops` in `conn`'s transaction; each op's outcome (not yet committed).

    With `announce`, the sagas the batch changed are NOTIFYed on `CHANNEL` in
    the same transaction, all in one statement.
    """
    outcomes: dict[Op, object] = {}
    changed: set[_Key] = set()
    grouped = rounds(ops)
    announced = False
    for number, round_ops in enumerate(grouped, 1):
        announced = await _apply_round(
            conn,
            round_ops,
            outcomes,
            changed,
            announce=announce and number == len(grouped),
        )
    if announce and changed and not announced:
        await run(conn, _NOTIFY, [notification_payloads(sorted(changed))])
    return outcomes


async def _rows(
    connection: Connection, statement: Statement, rows: list[dict[str, Any]]
) -> set[_Key]:
    """Run a set-based statement over `rows` (one array per column); the keys it returned."""
    if not rows:
        return set()
    _, returned = await run(
        connection, statement, [[row[name] for row in rows] for name in statement.names]
    )
    return {(facade, request_id) for facade, request_id in returned}


def _key(op: ApplyOp | BeginOp) -> _Key:
    if isinstance(op, BeginOp):
        return op.saga.facade, op.saga.request_id
    return op.facade, op.request_id


async def _apply_round(
    conn: Connection,
    ops: list[Op],
    outcomes: dict[Op, object],
    changed: set[_Key],
    *,
    announce: bool,
) -> bool:
    """One statement per kind of write, rows sorted by key; the sagas it changed go to `changed`.

    With `announce` (the batch's last round), the batch's changes are NOTIFYed
    with the round's step starts when it has any and nothing comes after them:
    returns whether it did.

    The sort gives concurrent writers one lock order, which keeps them from
    deadlocking on the rows they share.
    """
    begins = sorted((op for op in ops if isinstance(op, BeginOp)), key=_key)
    created = await _rows(
        conn,
        _BEGIN,
        [
            {
                "f": op.saga.facade,
                "r": op.saga.request_id,
                "kind": op.saga.kind,
                "payload": op.saga.payload,
                "hash": op.saga.payload_hash,
                "owner": op.saga.owner,
                "at": op.at,
                "deadline": op.saga.deadline_at,
            }
            for op in begins
        ],
    )
    changed |= created
    starts = []
    for begin in begins:
        outcomes[begin] = _key(begin) in created
        if outcomes[begin]:
            starts.append(
                {
                    "f": begin.saga.facade,
                    "r": begin.saga.request_id,
                    "idx": 0,
                    "name": begin.saga.first_step,
                    "at": begin.at,
                }
            )

    changes = sorted((op for op in ops if isinstance(op, ApplyOp)), key=_key)
    by_kind: dict[type, list[ApplyOp]] = {}
    for op in changes:
        by_kind.setdefault(type(op.change), []).append(op)
        outcomes[op] = False

    def base(op: ApplyOp, **values: object) -> dict[str, object]:
        return {"f": op.facade, "r": op.request_id, **values}

    restarted = by_kind.get(StepRestarted, [])
    applied = await _rows(
        conn,
        _STEP_RESTARTED,
        [base(op, idx=_index(op), at=op.at) for op in restarted],
    )
    pending = by_kind.get(StepPending, [])
    waiting = await _rows(
        conn,
        _STEP_PENDING,
        [base(op, idx=_index(op), reason=_change(op, StepPending).reason) for op in pending],
    )
    applied |= waiting
    # A step's wait has no time of its own: the saga's row says when it began.
    await _rows(conn, _TOUCH, [base(op, at=op.at) for op in pending if _key(op) in waiting])

    ended = by_kind.get(StepEnded, [])
    done = await _rows(
        conn,
        _STEP_DONE,
        [base(op, idx=_index(op), at=op.at, data=_change(op, StepEnded).data) for op in ended],
    )
    applied |= done
    completing = [op for op in ended if _key(op) in done and _change(op, StepEnded).complete]
    starts += [
        base(op, idx=_index(op) + 1, name=_change(op, StepEnded).next_step, at=op.at)
        for op in ended
        if _key(op) in done and not _change(op, StepEnded).complete
    ]
    completed = await _rows(conn, _COMPLETE, [base(op, at=op.at) for op in completing])
    _followed(completing, completed)

    failing = by_kind.get(StepFailed, [])
    failed_steps = await _rows(
        conn,
        _STEP_FAILED,
        [
            base(
                op,
                idx=_index(op),
                at=op.at,
                reason=_change(op, StepFailed).reason,
                data=_change(op, StepFailed).data,
            )
            for op in failing
        ],
    )
    applied |= failed_steps
    failing = [op for op in failing if _key(op) in failed_steps]
    await _rows(
        conn,
        _UNDO,
        [base(op, idx=index) for op in failing for index in _change(op, StepFailed).undo],
    )
    moved = await _rows(
        conn,
        _FAIL,
        [
            base(
                op,
                state=str(_change(op, StepFailed).then),
                code=_change(op, StepFailed).code,
                reason=_change(op, StepFailed).reason,
                deadline=_failed_deadline(_change(op, StepFailed)),
                at=op.at,
            )
            for op in failing
        ],
    )
    _followed(failing, moved)

    ending = by_kind.get(CompensationEnded, [])
    compensated = await _rows(
        conn,
        _COMPENSATION_ENDED,
        [
            base(
                op,
                state=str(_change(op, CompensationEnded).state),
                at=op.at,
                error=ended_reason(_change(op, CompensationEnded)),
            )
            for op in ending
        ],
    )
    applied |= compensated
    undone: list[dict[str, object]] = []
    for op in ending:
        if _key(op) not in compensated:
            continue
        change = _change(op, CompensationEnded)
        undone += [base(op, idx=i, state="DONE", at=op.at, error="") for i in change.done]
        if change.failed is not None:
            undone.append(base(op, idx=change.failed, state="FAILED", at=op.at, error=change.error))
    await _rows(conn, _UNDONE, undone)

    changed |= applied
    for change_op in changes:
        outcomes[change_op] = _key(change_op) in applied
    upkeep = any(isinstance(op, HeartbeatOp | ClaimOp | OperatorOp) for op in ops)
    announced = announce and bool(starts) and not upkeep
    await _start_steps(conn, starts, changed if announced else None)
    await _upkeep(conn, ops, outcomes, changed)
    return announced


async def _start_steps(
    conn: Connection, starts: list[dict[str, object]], announce: set[_Key] | None
) -> None:
    """Insert the `starts` steps; with `announce`, NOTIFY those sagas in the same statement."""
    if announce is None:
        await _rows(conn, _STEP_START, starts)
        return
    columns: dict[str, list[Any]] = {name: [row[name] for row in starts] for name in starts[0]}
    columns["payloads"] = notification_payloads(sorted(announce))
    await run(
        conn, _STEP_START_AND_NOTIFY, [columns[name] for name in _STEP_START_AND_NOTIFY.names]
    )


async def _upkeep(
    conn: Connection, ops: list[Op], outcomes: dict[Op, object], changed: set[_Key]
) -> None:
    """A round's heartbeats and claims; the sagas claimed go to `changed`."""
    beats = sorted((op for op in ops if isinstance(op, HeartbeatOp)), key=lambda op: op.owner)
    await _rows(conn, _HEARTBEAT, [{"owner": op.owner, "at": op.at} for op in beats])
    outcomes.update(dict.fromkeys(beats))

    await _one_by_one(conn, ops, outcomes, changed)


async def _one_by_one(
    conn: Connection, ops: list[Op], outcomes: dict[Op, object], changed: set[_Key]
) -> None:
    """The round's claims and operators' writes, each by statements of its own; the sagas
    they moved go to `changed`."""
    for other in ops:
        if isinstance(other, ClaimOp):
            claimed = await _claim(conn, other)
            outcomes[other] = claimed
            changed.update(key for key, _ in claimed)
        elif isinstance(other, OperatorOp):
            # Rare: one by one, after the engine's writes of the round (a saga's earlier
            # writes are in earlier rounds).
            outcomes[other] = await run_postgres(conn, other, lambda op: _engine(conn, op))
            if isinstance(other, ActOp) and outcomes[other] is True:
                changed.add((other.facade, other.request_id))


async def _engine(conn: Connection, op: ApplyOp) -> bool:
    """One of the engine's changes, as a batch of its own (an operator's move that is one);
    announced with the batch it belongs to."""
    outcomes = await apply_batch(conn, [op], announce=False)
    return outcomes[op] is True


async def _claim(conn: Connection, op: ClaimOp) -> list[tuple[_Key, bool]]:
    found: dict[_Key, tuple[bool, str, datetime | None]] = {}
    values: dict[str, object] = {
        "me": op.owner,
        "now": op.at,
        "stale": op.stale_before,
        "limit": CLAIM_BATCH,
    }
    for statement, expired in ((_EXPIRED, True), (_ORPHANS, False)):
        _, rows = await run(conn, statement, [values[name] for name in statement.names])
        for facade, request_id, owner, deadline in rows:
            found.setdefault((facade, request_id), (expired, owner, deadline))
    candidates = sorted(found.items())[:CLAIM_BATCH]
    if not candidates:
        return []
    values = {
        "me": op.owner,
        "hold": op.hold_until,
        "now": op.at,
        "f": [key[0] for key, _ in candidates],
        "r": [key[1] for key, _ in candidates],
        "owner": [owner for _, (_, owner, _) in candidates],
        "deadline": [deadline for _, (_, _, deadline) in candidates],
    }
    _, rows = await run(conn, _CLAIM, [values[name] for name in _CLAIM.names])
    taken = {(facade, request_id) for facade, request_id in rows}
    return [(key, expired) for key, (expired, _, _) in candidates if key in taken]


def _failed_deadline(change: StepFailed) -> datetime | None:
    """A failed saga's deadline: its compensation's, or none when it ends at once."""
    return change.deadline_at if change.then == SagaState.COMPENSATING else None


def _index(op: ApplyOp) -> int:
    change = op.change
    assert not isinstance(change, CompensationEnded)
    return change.index


def _change(op: ApplyOp, kind: type[_C]) -> _C:
    change = op.change
    assert isinstance(change, kind)
    return change


def _followed(ops: Sequence[ApplyOp], moved: set[_Key]) -> None:
    for op in ops:
        if _key(op) not in moved:
            raise JournalBroken(op.facade, op.request_id)


async def run_postgres(
    conn: Connection, op: OperatorOp, engine: Callable[[ApplyOp], Awaitable[bool]]
) -> object:
    """Carry out `op`'s plan on PostgreSQL, in `conn`'s transaction at `op.at`; `engine`
    applies one of the engine's changes."""
    steps = plan(op, op.at)
    try:
        step = next(steps)
        while True:
            if isinstance(step, Engine):
                done = Done(int(await engine(step.op)))
            else:
                statement = _statement(step.sql, lock=step.lock)
                count, rows = await run(
                    conn, statement, [step.params[name] for name in statement.names]
                )
                done = Done(count, rows)
            step = steps.send(done)
    except StopIteration as stop:
        return stop.value


@functools.cache
def _statement(sql: str, *, lock: bool) -> Statement:
    return Statement(f"{sql} FOR UPDATE" if lock else sql)
