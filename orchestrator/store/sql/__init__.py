"""The saga store on SQL: SQLite or PostgreSQL (asyncpg), with group commit.

See `SqlSagaStore`; the tables are in `_schema`, created and upgraded by the
migrations in `_migrations`.
"""

from orchestrator.store.sql._store import SqlSagaStore, WriterStats

__all__ = ["SqlSagaStore", "WriterStats"]
