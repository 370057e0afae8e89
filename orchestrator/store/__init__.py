"""Saga stores: the protocol, the in-memory one for tests and the SQL one, chosen by URL."""

from typing import TYPE_CHECKING, Any

from orchestrator.store.base import (
    FINAL_STATES,
    BeginResult,
    SagaPage,
    SagaRecord,
    SagaState,
    SagaStore,
    StepRecord,
    StepState,
)
from orchestrator.store.memory import InMemorySagaStore

if TYPE_CHECKING:
    from orchestrator.store.sql import SqlSagaStore

__all__ = [
    "FINAL_STATES",
    "BeginResult",
    "InMemorySagaStore",
    "SagaPage",
    "SagaRecord",
    "SagaState",
    "SagaStore",
    "SqlSagaStore",
    "StepRecord",
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
    """The store `url` names: `memory://`, `sqlite+aiosqlite:///file.db` or
    `postgresql+asyncpg://user@host:port/db` (`sqlite://`, `postgresql://` get those drivers).
    Not started yet: `await store.start()`."""
    if url.strip() == "memory://":
        return InMemorySagaStore()
    from orchestrator.store.sql import SqlSagaStore

    return SqlSagaStore(url)
