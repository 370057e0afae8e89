"""Saga stores: the protocol, the in-memory one and the SQL one, chosen by URL."""

from typing import TYPE_CHECKING, Any

from orchestrator.store.base import CLAIM_BATCH, MAX_PAGE_SIZE, SagaStore
from orchestrator.store.changes import (
    Change,
    CompensationEnded,
    StepEnded,
    StepFailed,
    StepPending,
    StepRestarted,
)
from orchestrator.store.memory import InMemorySagaStore
from orchestrator.store.operator import (
    RESOLVABLE,
    ActionRecord,
    CompensationRetried,
    DeadLetterPage,
    DeadLetterRecord,
    DeadLetterState,
    NewDeadLetter,
    OperatorChange,
    Resolved,
    Retried,
)
from orchestrator.store.records import (
    FINAL_STATES,
    IN_PROCESS_KINDS,
    CompensationState,
    NewSaga,
    Position,
    SagaPage,
    SagaRecord,
    SagaState,
    Stalled,
    StepRecord,
    StepState,
)

if TYPE_CHECKING:
    from orchestrator.store.sql import SqlSagaStore

__all__ = [
    "CLAIM_BATCH",
    "FINAL_STATES",
    "IN_PROCESS_KINDS",
    "MAX_PAGE_SIZE",
    "RESOLVABLE",
    "ActionRecord",
    "Change",
    "CompensationEnded",
    "CompensationRetried",
    "CompensationState",
    "DeadLetterPage",
    "DeadLetterRecord",
    "DeadLetterState",
    "InMemorySagaStore",
    "NewDeadLetter",
    "NewSaga",
    "OperatorChange",
    "Position",
    "Resolved",
    "Retried",
    "SagaPage",
    "SagaRecord",
    "SagaState",
    "SagaStore",
    "SqlSagaStore",
    "Stalled",
    "StepEnded",
    "StepFailed",
    "StepPending",
    "StepRecord",
    "StepRestarted",
    "StepState",
    "store_from_url",
]


def __getattr__(name: str) -> Any:
    # SQLAlchemy is imported only by those who use the SQL store.
    if name == "SqlSagaStore":
        from orchestrator.store.sql import SqlSagaStore

        return SqlSagaStore
    raise AttributeError(name)


def store_from_url(url: str) -> SagaStore:
    """The store `url` names: `memory://` (or empty), `sqlite+aiosqlite:///file.db` or
    `postgresql+asyncpg://user@host:port/db` (`sqlite://`, `postgresql://` get those drivers).
    Not started yet: `await store.start()`."""
    if url.strip() in ("", "memory://"):
        return InMemorySagaStore()
    from orchestrator.store.sql import SqlSagaStore

    return SqlSagaStore(url)
