"""The saga store on SQL: SQLite or PostgreSQL (asyncpg), with group commit."""

from orchestrator.store.sql._store import (
    SqlSagaStore,
    WriterStats,
    metadata,
    replicas,
    saga_steps,
    sagas,
)

__all__ = ["SqlSagaStore", "WriterStats", "metadata", "replicas", "saga_steps", "sagas"]
