"""Reading sagas: one statement returns a saga and its steps, folded into a record.

One statement is one snapshot: a saga and its steps are always consistent
without an explicit transaction, and a read costs one round trip.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Select, select
from sqlalchemy.sql.elements import ColumnElement

from orchestrator.store.records import (
    CompensationState,
    Position,
    SagaRecord,
    SagaState,
    StepRecord,
    StepState,
)
from orchestrator.store.sql._schema import saga_steps, sagas

__all__ = [
    "POSITION",
    "SQLITE_GET",
    "decode_token",
    "encode_token",
    "position",
    "records",
    "records_query",
]

_SAGA_COLUMNS: Final = (
    "facade",
    "request_id",
    "kind",
    "state",
    "payload",
    "payload_hash",
    "data",
    "data_at",
    "owner",
    "error_code",
    "error_reason",
    "created_at",
    "updated_at",
    "deadline_at",
)
_STEP_COLUMNS: Final = (
    "idx",
    "name",
    "state",
    "attempts",
    "started_at",
    "finished_at",
    "error",
    "data",
    "compensation",
    "compensated_at",
    "compensation_error",
)

SQLITE_GET: Final = (
    "SELECT "
    + ", ".join(f"s.{name}" for name in _SAGA_COLUMNS)
    + ", "
    + ", ".join(f"st.{name}" for name in _STEP_COLUMNS)
    + " FROM sagas s LEFT OUTER JOIN saga_steps st ON st.saga_id = s.id"
    " WHERE s.facade = ? AND s.request_id = ? ORDER BY st.idx"
)
"""A saga and its steps on SQLite's own driver (read on the event loop: a point lookup)."""


POSITION: Final = (
    "SELECT s.state, s.payload, st.state, st.data FROM sagas s"
    " JOIN saga_steps st ON st.saga_id = s.id"
    " WHERE s.facade = {} AND s.request_id = {} ORDER BY st.idx"
)
"""Where a saga stands (see `Position`), with the backend's placeholders put in."""


def position(rows: Sequence[Sequence[Any]]) -> Position | None:
    """The position the rows of `POSITION` describe (none: no saga)."""
    if not rows:
        return None
    return Position(
        SagaState(rows[0][0]),
        rows[0][1],
        tuple(StepState(row[2]) for row in rows),
        tuple(row[3] for row in rows),
    )


def records_query(*criteria: ColumnElement[bool], limit: int | None = None) -> Select[Any]:
    """Sagas matching `criteria`, newest first, joined with their steps in one statement.

    The columns come in the order `records` expects.
    """
    inner = (
        select(sagas)
        .where(*criteria)
        .order_by(sagas.c.created_at.desc(), sagas.c.facade.desc(), sagas.c.request_id.desc())
    )
    if limit is not None:
        inner = inner.limit(limit)
    s = inner.subquery("s")
    step_columns = [saga_steps.c[name].label(f"step_{name}") for name in _STEP_COLUMNS]
    return (
        select(*(s.c[name] for name in _SAGA_COLUMNS), *step_columns)
        .select_from(s.outerjoin(saga_steps, saga_steps.c.saga_id == s.c.id))
        .order_by(s.c.created_at.desc(), s.c.facade.desc(), s.c.request_id.desc(), saga_steps.c.idx)
    )


def _time(value: Any) -> datetime:
    if isinstance(value, str):  # SQLite's own driver: naive UTC text
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    stamp: datetime = value
    return stamp if stamp.tzinfo is UTC else stamp.astimezone(UTC)


def _maybe_time(value: Any) -> datetime | None:
    return None if value is None else _time(value)


def records(rows: Iterable[Sequence[Any]]) -> list[SagaRecord]:
    """Fold joined saga/step rows (columns as `records_query` orders them) into records,
    keeping the rows' order."""
    grouped: dict[tuple[str, str], tuple[Sequence[Any], list[StepRecord]]] = {}
    width = len(_SAGA_COLUMNS)
    for row in rows:
        key = (row[0], row[1])
        entry = grouped.get(key)
        if entry is None:
            entry = grouped[key] = (row, [])
        if row[width] is not None:
            (
                idx,
                name,
                state,
                attempts,
                started,
                finished,
                error,
                data,
                comp,
                comp_at,
                comp_err,
            ) = row[width:]
            entry[1].append(
                StepRecord(
                    index=idx,
                    name=name,
                    state=StepState(state),
                    attempts=attempts,
                    started_at=_time(started),
                    finished_at=_maybe_time(finished),
                    error=error,
                    data=data,
                    compensation=CompensationState(comp),
                    compensated_at=_maybe_time(comp_at),
                    compensation_error=comp_err,
                )
            )
    return [_record(row, steps) for row, steps in grouped.values()]


def _record(row: Sequence[Any], steps: list[StepRecord]) -> SagaRecord:
    """One saga from its row and its steps (in order).

    Its data: the saga row's once written there (by a version of the store that
    did), else that of its last step that left data. Steps run in order, so their
    index orders their data, whichever replica's clock wrote it. Its updated_at:
    the latest write to the row or to a step.
    """
    (facade, request_id, kind, state, payload, payload_hash, data, data_at, owner) = row[:9]
    (error_code, error_reason, created_at, updated_at, deadline_at) = row[9:14]
    if data_at is None:
        data = next((step.data for step in reversed(steps) if step.data is not None), data)
    latest = _time(updated_at)
    for step in steps:
        for moment in (step.started_at, step.finished_at, step.compensated_at):
            if moment is not None and moment > latest:
                latest = moment
    return SagaRecord(
        facade=facade,
        request_id=request_id,
        kind=kind,
        state=SagaState(state),
        payload=payload,
        payload_hash=payload_hash,
        data=data,
        owner=owner,
        created_at=_time(created_at),
        updated_at=latest,
        deadline_at=_maybe_time(deadline_at),
        error_code=error_code,
        error_reason=error_reason,
        steps=tuple(steps),
    )


def encode_token(saga: SagaRecord) -> str:
    """The page token that resumes a listing after `saga`."""
    raw = json.dumps(
        [saga.created_at.isoformat(), saga.facade, saga.request_id], separators=(",", ":")
    )
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str) -> tuple[datetime, str, str]:
    """The position a page token names; ValueError for a token this store did not issue."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created_at, facade, request_id = json.loads(raw)
        moment = datetime.fromisoformat(created_at)
    except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
        raise ValueError("invalid page token") from exc
    if not isinstance(facade, str) or not isinstance(request_id, str) or moment.tzinfo is None:
        raise ValueError("invalid page token")
    return moment, facade, request_id
