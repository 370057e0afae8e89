"""The PostgreSQL store's usual batch as one statement, committed on its own.

Most batches hold only the engine's happy path: sagas begun and steps ended,
one op per saga. The general path (`_postgres.apply_batch`) writes such a batch
in an explicit transaction, a statement per kind of write: BEGIN, the sagas'
inserts, the steps' ends, the sagas' completions, the next steps' starts with
the NOTIFY, COMMIT, each a round trip of its own (about 30 µs of the
orchestrator's CPU each, and the server's work for each statement). Here the
batch is one statement of data-modifying WITH queries, which PostgreSQL runs as
one implicit transaction: one round trip, every write or none.

Within the statement each compare-and-set keeps its order: a step's row is
updated first (its condition is the step's state), and only the sagas whose
step matched go on to their row (`completed` follows `done`). The journal's
invariant is checked in the statement too: a saga whose current step ended
but whose row could not follow (it was not RUNNING) makes the statement fail
with an error naming it, raised here as `JournalBroken`, so that nothing of the
batch commits. The sagas the batch changed are NOTIFYed from the statement
itself, in payloads as `notification_payloads` makes them.

Like a failed COMMIT on the general path, a connection lost while the
statement runs leaves it unknown whether it committed.

What it costs the database: while the tables are small the store's sessions
plan every execution anew (`_plans`), and this statement takes about 380 µs
to plan against some 200 for the general path's statements. With 64 sagas in
flight the database then spends about 7% more per saga and the orchestrator a
third less; with 8, the database's extra is about what the orchestrator saves
(bench/README.md). Once the tables have filled the writer keeps its plans,
and planning costs nothing per batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy.exc import DBAPIError

from orchestrator.store.changes import StepEnded
from orchestrator.store.sql._asyncpg import Connection, Statement, run
from orchestrator.store.sql._listen import CHANNEL, MAX_PAYLOAD_BYTES
from orchestrator.store.sql._ops import ApplyOp, BeginOp, JournalBroken, Op
from orchestrator.store.sql._postgres import unnest
from orchestrator.store.sql._schema import state_is

__all__ = ["apply_in_one", "fits_one_statement"]

_BROKEN: Final = "orchestrator journal broken: "
"""How the statement's error names a saga whose row could not follow its step."""
_WINDOW: Final = MAX_PAYLOAD_BYTES - 1600
"""NOTIFY payloads take the pairs whose running size ends in one window of this many bytes:
a payload is then at most a window and one pair (a facade name and a request id, 128
characters each, at most about 1550 bytes as JSON even with every character escaped),
under PostgreSQL's limit."""


_WRITES: Final = (
    "WITH b AS (SELECT * FROM "
    + unnest(
        "b_",
        f="text",
        r="text",
        kind="text",
        payload="text",
        hash="text",
        owner="text",
        at="timestamptz",
        deadline="timestamptz",
        first="text",
    )
    + "), begun AS ("
    "INSERT INTO sagas (facade, request_id, kind, state, payload, payload_hash, data, owner,"
    " error_code, error_reason, created_at, updated_at, deadline_at)"
    " SELECT f, r, kind, 'RUNNING', payload, hash, '', owner, '', '', at, at, deadline FROM b"
    " ON CONFLICT (facade, request_id) DO NOTHING"
    " RETURNING id, facade, request_id"
    "), e AS (SELECT * FROM "
    + unnest(
        "e_",
        f="text",
        r="text",
        idx="int",
        at="timestamptz",
        data="text",
        complete="bool",
        next="text",
    )
    + "), done AS ("
    "UPDATE saga_steps s SET state = 'DONE', finished_at = c.at, data = c.data"
    " FROM e AS c JOIN sagas g ON g.facade = c.f AND g.request_id = c.r"
    " WHERE s.saga_id = g.id AND s.idx = c.idx AND s.state = 'RUNNING'"
    " RETURNING g.id, g.facade, g.request_id, c.idx, c.at, c.complete, c.next"
    "), completed AS ("
    "UPDATE sagas s SET state = 'COMPLETED', deadline_at = NULL, updated_at = d.at"
    f" FROM done d WHERE d.complete AND s.id = d.id AND {state_is('RUNNING', of='s')}"
    " RETURNING s.id"
    "), started AS ("
    "INSERT INTO saga_steps (saga_id, idx, name, state, attempts, started_at, error,"
    " compensation, compensation_error)"
    " SELECT n.id, 0, b.first, 'RUNNING', 1, b.at, '', '', ''"
    " FROM begun n JOIN b ON b.f = n.facade AND b.r = n.request_id"
    " UNION ALL SELECT d.id, d.idx + 1, d.next, 'RUNNING', 1, d.at, '', '', ''"
    " FROM done d WHERE NOT d.complete"
    "), changed AS ("
    "SELECT 'begun' AS what, facade, request_id FROM begun"
    " UNION ALL SELECT 'done', facade, request_id FROM done"
    ")"
)
# The main query reads every CTE whose output matters; the data-modifying ones run to
# completion whether read or not. A broken saga's row makes the CAST fail, and with it the
# statement (its text is no integer); it is evaluated only for such a row.
_RESULT: Final = (
    " SELECT what, facade, request_id FROM changed"
    " UNION ALL SELECT 'broken', d.facade,"
    f" CAST(CAST('{_BROKEN}' || json_build_array(d.facade, d.request_id) AS integer) AS text)"
    " FROM done d WHERE d.complete AND NOT EXISTS (SELECT 1 FROM completed x WHERE x.id = d.id)"
)
_NOTIFY: Final = (
    ", pairs AS (SELECT '[' || to_json(facade)::text || ',' || to_json(request_id)::text"
    " || ']' AS pair FROM changed)"
    ", windows AS (SELECT pair, sum(octet_length(pair) + 1) OVER (ORDER BY pair"
    f" ROWS UNBOUNDED PRECEDING) / {_WINDOW} AS window_ FROM pairs)"
    ", notified AS (SELECT pg_notify("
    f"'{CHANNEL}', '[' || string_agg(pair, ',' ORDER BY pair) || ']') FROM windows"
    " GROUP BY window_)"
)
_ONE: Final = Statement(_WRITES + _RESULT)
_ONE_AND_NOTIFY: Final = Statement(
    _WRITES + _NOTIFY + _RESULT + " UNION ALL SELECT 'notified', '', '' FROM notified"
)


def fits_one_statement(ops: Sequence[Op]) -> bool:
    """Whether `ops` are the happy path's alone: sagas begun and steps ended, one op per
    saga (a saga's second op must see its first, so it needs a round of its own)."""
    keys = set()
    for op in ops:
        if isinstance(op, ApplyOp):
            if type(op.change) is not StepEnded:
                return False
        elif not isinstance(op, BeginOp):
            return False
        keys.add(op.key)
    return bool(ops) and len(keys) == len(ops)


async def apply_in_one(
    conn: Connection, ops: Sequence[Op], *, announce: bool = True
) -> dict[Op, object]:
    """Apply `ops` (they must fit: `fits_one_statement`) by one statement outside any explicit
    transaction: committed once it returns. Each op's outcome, as `apply_batch` gives it."""
    begins = sorted((op for op in ops if isinstance(op, BeginOp)), key=lambda op: op.key)
    ends = sorted((op for op in ops if isinstance(op, ApplyOp)), key=lambda op: op.key)
    values: dict[str, list[Any]] = {
        "b_f": [op.saga.facade for op in begins],
        "b_r": [op.saga.request_id for op in begins],
        "b_kind": [op.saga.kind for op in begins],
        "b_payload": [op.saga.payload for op in begins],
        "b_hash": [op.saga.payload_hash for op in begins],
        "b_owner": [op.saga.owner for op in begins],
        "b_at": [op.at for op in begins],
        "b_deadline": [op.saga.deadline_at for op in begins],
        "b_first": [op.saga.first_step for op in begins],
        "e_f": [op.facade for op in ends],
        "e_r": [op.request_id for op in ends],
    }
    changes = [_ended(op) for op in ends]
    values["e_idx"] = [change.index for change in changes]
    values["e_at"] = [op.at for op in ends]
    values["e_data"] = [change.data for change in changes]
    values["e_complete"] = [change.complete for change in changes]
    values["e_next"] = [change.next_step for change in changes]
    statement = _ONE_AND_NOTIFY if announce else _ONE
    try:
        _, rows = await run(conn, statement, [values[name] for name in statement.names])
    except DBAPIError as exc:
        broken = _broken(exc)
        if broken is None:
            raise
        raise JournalBroken(*broken) from exc
    begun = {(facade, request_id) for what, facade, request_id in rows if what == "begun"}
    done = {(facade, request_id) for what, facade, request_id in rows if what == "done"}
    outcomes: dict[Op, object] = {}
    for begin in begins:
        outcomes[begin] = (begin.saga.facade, begin.saga.request_id) in begun
    for end in ends:
        outcomes[end] = (end.facade, end.request_id) in done
    return outcomes


def _ended(op: ApplyOp) -> StepEnded:
    change = op.change
    assert isinstance(change, StepEnded)
    return change


def _broken(exc: DBAPIError) -> tuple[str, str] | None:
    """The saga the statement's journal check named, when that is why it failed."""
    message = str(exc.orig)
    start = message.find(_BROKEN)
    if start < 0:
        return None
    text = message[start + len(_BROKEN) :]
    try:
        facade, request_id = json.JSONDecoder().raw_decode(text)[0]
    except ValueError:
        return None
    return str(facade), str(request_id)
