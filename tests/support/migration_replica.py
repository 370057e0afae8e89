"""A replica starting, for tests/test_migrations.py: it upgrades the saga store's schema on cue.

    python -m tests.support.migration_replica URL

Builds an engine as `SqlSagaStore` builds its own, prints ``ready`` once
everything is imported, waits for a line on stdin (so that several replicas
start upgrading together), runs `upgrade` and prints ``reached <revision>``.
Alembic's log lines ("Running upgrade ...") go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from orchestrator.store.sql._migrate import upgrade

__all__ = ["engine_like_the_store"]


def engine_like_the_store(url: str) -> AsyncEngine:
    """An engine built as `SqlSagaStore` builds its own (see `_sqlite_pragmas` there): on
    SQLite, connections in WAL mode that leave transactions to their user
    (`isolation_level=None`). The file must be in WAL mode already."""
    if make_url(url).get_backend_name() != "sqlite":
        return create_async_engine(url, hide_parameters=True)
    engine = create_async_engine(url, hide_parameters=True, pool_reset_on_return=None)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
        dbapi_connection.isolation_level = None

    return engine


async def _upgrade(url: str) -> str:
    engine = engine_like_the_store(url)
    try:
        return await upgrade(engine)
    finally:
        await engine.dispose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    print("ready", flush=True)
    sys.stdin.readline()
    print("reached", asyncio.run(_upgrade(sys.argv[1])), flush=True)
