"""Operators' writes and reads on the SQL store: their moves of sagas with the actions that
record them, and the dead-letter list.

Operators act rarely, so their writes stay off the engine's hot path: each op
is applied on its own, by a few plain statements, inside the writer's
transaction like every other write. What an op does is written once, as a
plan (`plan`): a generator that yields the statements to run (text with
`:name` parameters, which both SQLite's own driver and SQLAlchemy take) and is
sent each one's outcome. Each backend carries it out (`run_sqlite` in
`_sqlite_apply`, `run_postgres` in `_postgres`). An operator's move that is
one of the engine's changes (or contains one: `Retried` is a `StepRestarted`
that also moves the deadline) is yielded as an `Engine` step, which each
backend applies by its own path for that change: the rules of `apply` hold for
`act` by construction.

Action rows are numbered per saga (`seq`: the saga's last one plus one). On
PostgreSQL the saga's row is locked before the number is taken, so two
replicas acting on one saga at once queue there rather than take the same
number; on SQLite the writer holds the database's write lock anyway. Every
operator op locks in the engine's order (a saga's current step, then its row),
so it deadlocks neither with the engine nor with another operator.

Reads go through SQLAlchemy Core (`actions_query`, `letters_query`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Select, bindparam, select
from sqlalchemy.sql.elements import ColumnElement

from orchestrator.store.changes import StepRestarted
from orchestrator.store.operator import (
    ActionRecord,
    CompensationRetried,
    DeadLetterRecord,
    DeadLetterState,
    Resolved,
    Retried,
)
from orchestrator.store.records import SagaState
from orchestrator.store.sql._ops import (
    ActOp,
    AddDeadLetterOp,
    ApplyOp,
    JournalBroken,
    OperatorOp,
    SettleDeadLetterOp,
    UnsettleDeadLetterOp,
)
from orchestrator.store.sql._schema import dead_letters, saga_actions, state_is

__all__ = [
    "Done",
    "Engine",
    "Statement",
    "action_records",
    "actions_query",
    "decode_letter_token",
    "encode_letter_token",
    "letter_records",
    "letters_query",
    "plan",
]

_KEY: Final = "facade = :f AND request_id = :r"
_STEP_KEY: Final = f"saga_id = (SELECT id FROM sagas WHERE {_KEY})"
"""A saga's steps, found by their saga's number (see `_schema`)."""
_RETRIED: Final = (
    "UPDATE sagas SET deadline_at = :deadline, updated_at = :at"
    f" WHERE {_KEY} AND {state_is('RUNNING')}"
)
_COMPENSATION_RETRIED: Final = (
    "UPDATE sagas SET state = 'COMPENSATING', deadline_at = :deadline, updated_at = :at"
    f" WHERE {_KEY} AND {state_is('COMPENSATION_FAILED')}"
)
_UNDO_AGAIN: Final = (
    "UPDATE saga_steps SET compensation = 'PENDING', compensated_at = NULL,"
    f" compensation_error = '' WHERE {_STEP_KEY} AND compensation = 'FAILED'"
)
# A current step exists only while its saga is RUNNING (the journal's invariant): it is
# what a resolution of a RUNNING saga contends on, as the engine's changes do.
_RESOLVE_STEP: Final = (
    "UPDATE saga_steps SET state = 'FAILED', finished_at = :at, error = :reason"
    f" WHERE {_STEP_KEY} AND state IN ('RUNNING', 'PENDING')"
)
_RESOLVE: Final = (
    "UPDATE sagas SET state = 'RESOLVED', deadline_at = NULL, updated_at = :at"
    f" WHERE {_KEY} AND (state || '') = :expect"  # by its key: see `state_is`
)
_SAGA: Final = f"SELECT 1 FROM sagas WHERE {_KEY}"
_ACTION: Final = (
    "INSERT INTO saga_actions (facade, request_id, seq, action, actor, note, at, dead_letter_id)"
    " VALUES (:f, :r, (SELECT coalesce(max(seq), 0) + 1 FROM saga_actions"
    # The key again, by parameters of its own: PostgreSQL deduces one type per parameter,
    # and a column's type in VALUES (varchar) is not the comparison's (text).
    " WHERE facade = :sf AND request_id = :sr), :action, :actor, :note, :at, :letter)"
)
_UNRECORD: Final = (
    f"DELETE FROM saga_actions WHERE {_KEY} AND action = 'replay' AND dead_letter_id = :letter"
)
_ADD_LETTER: Final = (
    "INSERT INTO dead_letters (id, topic, facade, request_id, step, message_id, body, headers,"
    " reason, delivery_count, dead_lettered_at, state, settled_at, settled_by, note)"
    " VALUES (:id, :topic, :facade, :request_id, :step, :message_id, :body, :headers,"
    " :reason, :delivery_count, :dead_lettered_at, 'WAITING', NULL, '', '')"
    " ON CONFLICT (id) DO NOTHING"
)
_SETTLE: Final = (
    "UPDATE dead_letters SET state = :state, settled_at = :at, settled_by = :by, note = :note"
    " WHERE id = :id AND state = 'WAITING'"
)
_UNSETTLE: Final = (
    "UPDATE dead_letters SET state = 'WAITING', settled_at = NULL, settled_by = '', note = ''"
    " WHERE id = :id AND state = 'REPLAYED'"
)
_LETTERS_SAGA: Final = "SELECT facade, request_id FROM dead_letters WHERE id = :id"


# --- plans: what each operator op does, whichever the backend ------------------------------------


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of a plan, with its parameters (datetimes as they are)."""

    sql: str
    params: Mapping[str, object] = field(default_factory=dict)
    lock: bool = False
    """A SELECT whose rows are locked for the transaction (FOR UPDATE, on PostgreSQL)."""


@dataclass(frozen=True, slots=True)
class Engine:
    """One of the engine's changes, applied by the backend's own path for it."""

    op: ApplyOp


@dataclass(frozen=True, slots=True)
class Done:
    """A step's outcome: the rows it changed (or, for an `Engine` step, 1 if applied), and
    the rows it returned."""

    rowcount: int
    rows: Sequence[Sequence[Any]] = ()


Plan = Generator[Statement | Engine, Done, object]


def plan(op: OperatorOp, at: datetime) -> Plan:
    """What `op` does, at `at` (the transaction's time); its outcome is the plan's value."""
    if isinstance(op, ActOp):
        return (yield from _act(op, at))
    if isinstance(op, AddDeadLetterOp):
        letter = op.letter
        added = yield Statement(
            _ADD_LETTER,
            {
                "id": letter.id,
                "topic": letter.topic,
                "facade": letter.facade,
                "request_id": letter.request_id,
                "step": letter.step,
                "message_id": letter.message_id,
                "body": bytes(letter.body),
                "headers": json.dumps(dict(letter.headers), sort_keys=True),
                "reason": letter.reason,
                "delivery_count": letter.delivery_count,
                "dead_lettered_at": letter.dead_lettered_at,
            },
        )
        return added.rowcount == 1
    if isinstance(op, SettleDeadLetterOp):
        action = op.action
        settled = yield Statement(
            _SETTLE,
            {
                "id": op.letter_id,
                "state": str(op.state),
                "at": action.at,
                "by": action.actor,
                "note": action.note,
            },
        )
        if settled.rowcount != 1:
            return False
        (facade, request_id), *_ = (yield Statement(_LETTERS_SAGA, {"id": op.letter_id})).rows
        yield from _record(facade, request_id, action)  # when its saga is there
        return True
    if isinstance(op, UnsettleDeadLetterOp):
        unsettled = yield Statement(_UNSETTLE, {"id": op.letter_id})
        if unsettled.rowcount != 1:
            return False
        (facade, request_id), *_ = (yield Statement(_LETTERS_SAGA, {"id": op.letter_id})).rows
        key = {"f": facade, "r": request_id}
        yield Statement(_SAGA, key, lock=True)
        yield Statement(_UNRECORD, {**key, "letter": op.letter_id})
        return True
    raise TypeError(f"unknown operator write {op!r}")


def _act(op: ActOp, at: datetime) -> Generator[Statement | Engine, Done, bool]:
    """The move (as `operator_transition` or the engine's `transition` say), then its action."""
    key = {"f": op.facade, "r": op.request_id}
    change = op.change
    if isinstance(change, Retried):
        restart = ApplyOp(op.at, op.future, op.facade, op.request_id, StepRestarted(change.index))
        moved = yield Engine(restart)
        if moved.rowcount:
            _follows(
                (yield Statement(_RETRIED, {**key, "deadline": change.deadline_at, "at": at})), op
            )
    elif isinstance(change, CompensationRetried):
        moved = yield Statement(
            _COMPENSATION_RETRIED, {**key, "deadline": change.deadline_at, "at": at}
        )
        if moved.rowcount:
            yield Statement(_UNDO_AGAIN, key)
    elif isinstance(change, Resolved):
        resolve = Statement(_RESOLVE, {**key, "at": at, "expect": str(change.expect)})
        if change.expect == SagaState.RUNNING:
            moved = yield Statement(_RESOLVE_STEP, {**key, "at": at, "reason": change.reason})
            if moved.rowcount:
                _follows((yield resolve), op)
        else:
            moved = yield resolve
    else:
        moved = yield Engine(op.as_apply())
    if not moved.rowcount:
        return False
    yield from _record(op.facade, op.request_id, op.action)
    return True


def _record(facade: str, request_id: str, action: ActionRecord) -> Generator[Statement, Done, bool]:
    """`action` as the saga's next one, if the saga is there (its row locked first)."""
    key = {"f": facade, "r": request_id}
    if not (yield Statement(_SAGA, key, lock=True)).rows:
        return False
    yield Statement(
        _ACTION,
        {
            **key,
            "sf": facade,
            "sr": request_id,
            "action": action.action,
            "actor": action.actor,
            "note": action.note,
            "at": action.at,
            "letter": action.dead_letter_id,
        },
    )
    return True


def _follows(done: Done, op: ActOp) -> None:
    """The saga's row moves with its current step's, or the journal's invariant breaks."""
    if done.rowcount != 1:
        raise JournalBroken(op.facade, op.request_id)


# --- reads ----------------------------------------------------------------------------------------


def actions_query() -> Select[Any]:
    """A saga's actions (parameters `f` and `r`), oldest first, as `ActionRecord` takes them."""
    c = saga_actions.c
    return (
        select(c.action, c.actor, c.note, c.at, c.dead_letter_id)
        .where(c.facade == bindparam("f"), c.request_id == bindparam("r"))
        .order_by(c.seq)
    )


def action_records(rows: Iterable[Any]) -> list[ActionRecord]:
    """The actions of `actions_query`'s rows, in their order."""
    return [
        ActionRecord(
            action=row.action,
            actor=row.actor,
            note=row.note,
            at=row.at,
            dead_letter_id=row.dead_letter_id,
        )
        for row in rows
    ]


def letters_query(*criteria: ColumnElement[bool], limit: int | None = None) -> Select[Any]:
    """Dead letters matching `criteria`, newest first (by time, then id)."""
    query = (
        select(dead_letters)
        .where(*criteria)
        .order_by(dead_letters.c.dead_lettered_at.desc(), dead_letters.c.id.desc())
    )
    return query if limit is None else query.limit(limit)


def letter_records(rows: Iterable[Any]) -> list[DeadLetterRecord]:
    """The dead letters of `letters_query`'s rows, in their order."""
    return [
        DeadLetterRecord(
            id=row.id,
            topic=row.topic,
            facade=row.facade,
            request_id=row.request_id,
            step=row.step,
            message_id=row.message_id,
            body=bytes(row.body),
            headers={str(name): str(value) for name, value in json.loads(row.headers).items()},
            reason=row.reason,
            delivery_count=row.delivery_count,
            dead_lettered_at=row.dead_lettered_at,
            state=DeadLetterState(row.state),
            settled_at=row.settled_at,
            settled_by=row.settled_by,
            note=row.note,
        )
        for row in rows
    ]


def encode_letter_token(letter: DeadLetterRecord) -> str:
    """The page token that resumes a dead-letter listing after `letter`."""
    raw = json.dumps([letter.dead_lettered_at.isoformat(), letter.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_letter_token(token: str) -> tuple[datetime, str]:
    """The position a dead-letter page token names; ValueError for one this store did not
    issue."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        at, letter_id = json.loads(raw)
        moment = datetime.fromisoformat(at)
    except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
        raise ValueError("invalid page token") from exc
    if not isinstance(letter_id, str) or moment.tzinfo is None:
        raise ValueError("invalid page token")
    return moment, letter_id
