"""The saga store on SQL: SQLite or PostgreSQL (asyncpg), with group commit.

See `SqlSagaStore`; the tables are in `_schema`, created and upgraded by the
migrations in `_migrations`. On PostgreSQL, `PgChangeFeed` (`_listen`) hears
every replica's writes through LISTEN / NOTIFY.
"""

from orchestrator.store.sql._listen import PgChangeFeed
from orchestrator.store.sql._store import SqlSagaStore
from orchestrator.store.sql._writer import WriterStats

__all__ = ["PgChangeFeed", "SqlSagaStore", "WriterStats"]
