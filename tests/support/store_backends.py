"""pytest plugin: the saga stores the journal's tests run on, and what they build sagas with.

`backend` is parametrized over the three stores: `InMemorySagaStore`, and
`SqlSagaStore` on a SQLite file and on PostgreSQL (the module's database, see
`tests.support.databases`), each started on an empty database. The helpers
begin sagas and bring them to a stage through `apply` (and operators' moves
through `act`), which check the journal's invariant (`check_journal`) after
every change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from orchestrator.store import (
    ActionRecord,
    Change,
    CompensationEnded,
    InMemorySagaStore,
    NewSaga,
    OperatorChange,
    SagaRecord,
    SagaState,
    SagaStore,
    SqlSagaStore,
    StepEnded,
    StepFailed,
    StepState,
)
from tests.support.databases import drop_store_tables

__all__ = [
    "FACADE",
    "Backend",
    "act",
    "action",
    "apply",
    "at_step",
    "check_journal",
    "compensating",
    "data",
    "finished",
    "get",
    "later",
    "new_saga",
    "shape",
]

FACADE = "booking"


@dataclasses.dataclass
class Backend:
    """A started store, and a way to open more on the same database (other replicas)."""

    name: str
    url: str
    store: SagaStore
    opened: list[SagaStore]

    async def another(self) -> SagaStore:
        """Another started store on the same database; in memory, the same store."""
        if isinstance(self.store, InMemorySagaStore):
            return self.store
        store = SqlSagaStore(self.url)
        self.opened.append(store)
        await store.start()
        return store


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each store in turn, started on an empty database; every store opened is closed after."""
    if request.param == "memory":
        url, store = "memory://", InMemorySagaStore()
    elif request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"
        store = SqlSagaStore(url)
    else:
        url = request.getfixturevalue("postgres_url")
        await drop_store_tables(url)
        store = SqlSagaStore(url)
    backend = Backend(request.param, url, store, [store])
    await store.start()
    yield backend
    for opened in backend.opened:
        await opened.close()


def later(seconds: float = 300) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def new_saga(
    request_id: str,
    *,
    facade: str = FACADE,
    kind: str = "sync",
    owner: str = "replica-a",
    payload: str = '{"hotel": "h1"}',
    deadline_at: datetime | None = None,
) -> NewSaga:
    return NewSaga(
        facade=facade,
        request_id=request_id,
        kind=kind,
        payload=payload,
        payload_hash=f"hash-{payload}",
        owner=owner,
        first_step="step-0",
        deadline_at=later() if deadline_at is None else deadline_at,
    )


def data(index: int) -> str:
    return f'{{"after": {index}}}'


def check_journal(saga: SagaRecord) -> None:
    """The journal's invariant (see `orchestrator.store.changes`): a RUNNING saga has exactly
    one current step, its last, after steps all DONE; a saga in any other state has none."""
    indexes = [step.index for step in saga.steps]
    assert indexes == list(range(len(indexes))), f"step log with gaps: {indexes}"
    current = [step.index for step in saga.steps if step.current]
    if saga.state == SagaState.RUNNING:
        assert current == [indexes[-1]], f"RUNNING saga with current steps {current}"
        assert all(step.state == StepState.DONE for step in saga.steps[:-1])
        assert saga.current_step is not None and saga.current_step.index == indexes[-1]
    else:
        assert current == [], f"{saga.state} saga with current steps {current}"
        assert saga.current_step is None


def shape(saga: SagaRecord) -> tuple[Any, ...]:
    """Everything of a record but the moments the store's clock chose."""
    steps = tuple(
        (
            step.index,
            step.name,
            step.state,
            step.attempts,
            step.finished_at is None,
            step.error,
            step.data,
            step.compensation,
            step.compensated_at is None,
            step.compensation_error,
        )
        for step in saga.steps
    )
    return (
        saga.facade,
        saga.request_id,
        saga.kind,
        saga.state,
        saga.payload,
        saga.data,
        saga.owner,
        saga.deadline_at,
        saga.error_code,
        saga.error_reason,
        steps,
    )


async def get(store: SagaStore, request_id: str, *, facade: str = FACADE) -> SagaRecord:
    saga = await store.get(facade, request_id)
    assert saga is not None, (facade, request_id)
    return saga


async def apply(store: SagaStore, request_id: str, change: Change, *, facade: str = FACADE) -> bool:
    """`store.apply`, then the invariant checked on what the store holds after it."""
    applied = await store.apply(facade, request_id, change)
    saga = await store.get(facade, request_id)
    if saga is not None:
        check_journal(saga)
    return applied


async def at_step(
    store: SagaStore, request_id: str, index: int, *, facade: str = FACADE, **saga: Any
) -> SagaRecord:
    """A saga RUNNING at step `index`, the steps before it DONE."""
    assert await store.begin(new_saga(request_id, facade=facade, **saga)) is None
    for done in range(index):
        ended = StepEnded(done, data(done), f"step-{done + 1}")
        assert await apply(store, request_id, ended, facade=facade)
    return await get(store, request_id, facade=facade)


async def compensating(store: SagaStore, request_id: str, **saga: Any) -> SagaRecord:
    """A saga COMPENSATING after its step 1 failed, both of its steps to undo."""
    await at_step(store, request_id, 1, **saga)
    failed = StepFailed(1, "FAILED_PRECONDITION", "declined", undo=(0, 1), deadline_at=later())
    assert await apply(store, request_id, failed)
    return await get(store, request_id)


async def finished(store: SagaStore, request_id: str, state: SagaState) -> SagaRecord:
    """A saga of two steps that ended in `state`."""
    if state == SagaState.COMPLETED:
        await at_step(store, request_id, 1)
        assert await apply(store, request_id, StepEnded(1, data(1), complete=True))
    else:
        await compensating(store, request_id)
        if state == SagaState.COMPENSATED:
            ended = CompensationEnded(SagaState.COMPENSATED, done=(0, 1))
        else:
            ended = CompensationEnded(
                SagaState.COMPENSATION_FAILED, done=(1,), failed=0, error="stuck"
            )
        assert await apply(store, request_id, ended)
    saga = await get(store, request_id)
    assert saga.state == state
    return saga


def action(
    name: str = "resolve", *, actor: str = "ops@example.com", note: str = ""
) -> ActionRecord:
    """An operator's action, as `act` and `settle_dead_letter` record it."""
    return ActionRecord(name, actor, note or f"{name} by hand", datetime.now(UTC))


async def act(
    store: SagaStore,
    request_id: str,
    change: Change | OperatorChange,
    done: ActionRecord | None = None,
    *,
    facade: str = FACADE,
) -> bool:
    """`store.act` (with `done`, or a fresh action), then the invariant checked on what the
    store holds after it."""
    applied = await store.act(facade, request_id, change, done or action())
    saga = await store.get(facade, request_id)
    if saga is not None:
        check_journal(saga)
    return applied
