"""The saga store's schema, brought up to date by its Alembic migrations as a store starts.

`upgrade(engine)` runs the revisions of `_migrations` that the database lacks,
all in one transaction, and returns the revision it reached:

- a fresh database goes from nothing to the newest revision (the head);
- a database the orchestrator made before it had migrations (the saga tables,
  no `alembic_version`) first gets the nullable columns an even earlier
  version lacked, is stamped with the baseline (`BASELINE`), then upgraded;
- a database at the head is left as it is;
- a database at a revision this code does not know (a newer version migrated
  it) is refused with `UnknownRevisionError`.

Replicas starting together take turns: the transaction first takes a lock that
only one holds at a time (PostgreSQL's advisory lock `MIGRATION_LOCK_KEY`,
SQLite's write lock by `BEGIN IMMEDIATE`), so the first upgrades the database
and the others find it at the head. Both backends have transactional DDL: a
migration that fails leaves the database as it was.

No `alembic.ini` is read: the configuration is built in code (`alembic_config`)
and the script directory's `env.py` runs the revisions on the connection handed
to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, DateTime, String, Text, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.types import TypeEngine

__all__ = [
    "BASELINE",
    "MIGRATIONS",
    "MIGRATION_LOCK_KEY",
    "SQLITE_LOCK_TIMEOUT",
    "UnknownRevisionError",
    "alembic_config",
    "upgrade",
]

log = logging.getLogger("orchestrator.store.sql")

MIGRATIONS: Final = Path(__file__).with_name("_migrations")
"""The Alembic script directory, shipped inside the package."""
BASELINE: Final = "0001"
"""The revision of the schema the orchestrator made before it had migrations."""
MIGRATION_LOCK_KEY: Final = 0x6F72636873616761
"""PostgreSQL advisory lock ("orchsaga") that serializes replicas' migrations."""
SQLITE_LOCK_TIMEOUT: Final = 60.0
"""How long, in seconds, an upgrade waits for SQLite's write lock (another replica migrating)."""

_OLD_TABLES: Final = ("sagas", "saga_steps", "replicas")
_OPTS: Final = {"transactional_ddl": True}
"""Alembic's options for the contexts made here: they too run inside the one transaction."""


class UnknownRevisionError(RuntimeError):
    """The database is at a revision this code does not know: a newer version migrated it."""

    def __init__(self, found: str, head: str) -> None:
        """`found` is the database's revision, `head` the newest this code knows."""
        super().__init__(
            f"the saga store's database is at revision {found!r}, which this version of the "
            f"orchestrator does not know (the newest it knows is {head!r}): a newer version "
            "migrated it (run that version, or restore a backup made before the upgrade), or "
            "another application's Alembic migrations share its alembic_version table"
        )
        self.found = found
        self.head = head


def alembic_config() -> Config:
    """An Alembic configuration for the store's migrations, built in code (no alembic.ini).

    To run revisions, put the connection in `config.attributes["connection"]`
    (`upgrade` does); `env.py` refuses to run without one.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


async def upgrade(engine: AsyncEngine, *, lock_timeout: float = SQLITE_LOCK_TIMEOUT) -> str:
    """Bring the database of `engine` to the newest revision; return the revision reached.

    Takes the migration lock first (see the module's docstring), so replicas
    calling this at once upgrade the database once. `lock_timeout` bounds the
    wait for SQLite's write lock; PostgreSQL's advisory lock is waited for as
    long as it takes. The engine may be built like the store builds it
    (SQLite connections with `isolation_level=None`, transactions begun by hand).
    """
    async with engine.connect() as conn:
        await _begin_locked(conn, lock_timeout)
        # Alembic's `op` and `context` stand for the migration running now, process-wide,
        # and run_sync lets the loop run other tasks at each statement: migrations of two
        # databases in one process take turns (of one database, the lock above already has).
        async with _alembic_turn():
            revision = await conn.run_sync(_upgrade)
        await conn.commit()
    return revision


async def _begin_locked(conn: AsyncConnection, lock_timeout: float) -> None:
    """Begin the migration's transaction on `conn`, holding the migration lock."""
    if conn.dialect.name != "sqlite":
        await conn.begin()
        if conn.dialect.name == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        return
    loop = asyncio.get_running_loop()
    give_up = loop.time() + lock_timeout
    while True:
        # SQLAlchemy's begin sends nothing to SQLite when the driver leaves transactions to
        # us (isolation_level=None, as the store's engine does); BEGIN IMMEDIATE takes the
        # write lock at once, waiting up to the connection's busy timeout for it.
        await conn.begin()
        try:
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
            return
        except OperationalError as error:
            await conn.rollback()
            if "locked" not in str(error.orig) or loop.time() >= give_up:
                raise
            log.info("saga store schema: waiting for another replica's migration")
        await asyncio.sleep(0.05)


_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


@contextlib.asynccontextmanager
async def _alembic_turn() -> AsyncIterator[None]:
    """This loop's turn to run Alembic."""
    loop = asyncio.get_running_loop()
    lock = _turns.get(loop)
    if lock is None:
        lock = _turns[loop] = asyncio.Lock()
    async with lock:
        yield


def _upgrade(conn: Connection) -> str:
    """Run the missing revisions on `conn`, inside its transaction."""
    config = alembic_config()
    config.attributes["connection"] = conn
    script = ScriptDirectory.from_config(config)
    head = script.get_current_head()
    assert head is not None, "the saga store's migrations have no head"
    found = MigrationContext.configure(conn, opts=_OPTS).get_current_revision()
    if found is None:
        if _adopt(conn):
            command.stamp(config, BASELINE)
            found = BASELINE
            log.info("saga store schema: tables made before migrations, stamped %s", BASELINE)
    elif found not in {revision.revision for revision in script.walk_revisions()}:
        raise UnknownRevisionError(found, head)
    if found != head:
        command.upgrade(config, "head")
    reached = MigrationContext.configure(conn, opts=_OPTS).get_current_revision()
    if reached != head:
        raise RuntimeError(f"saga store schema: upgraded to {reached!r}, not to {head!r}")
    if found != head:
        log.info("saga store schema: upgraded from %s to %s", found or "nothing", head)
    return head


def _utc_datetime() -> TypeEngine[datetime]:
    return DateTime(timezone=True).with_variant(String(26), "sqlite")


def _adopt(conn: Connection) -> bool:
    """Bring tables made before migrations to the baseline; False if there are none.

    The old code's `create_all` made all three tables at once, and later
    versions added nullable columns to them as they started; the columns added
    that way are added here. An incomplete set of tables is not the
    orchestrator's: refused.
    """
    inspector = inspect(conn)
    present = [name for name in _OLD_TABLES if inspector.has_table(name)]
    if not present:
        return False
    if len(present) < len(_OLD_TABLES):
        missing = [name for name in _OLD_TABLES if name not in present]
        raise RuntimeError(
            f"the saga store's database has the tables {present} but not {missing}, and no "
            "alembic_version: it was not made by the orchestrator; use another database"
        )
    late_columns: dict[str, Column[Any]] = {
        "sagas": Column("data_at", _utc_datetime(), nullable=True),
        "saga_steps": Column("data", Text, nullable=True),
    }
    ops = Operations(MigrationContext.configure(conn, opts=_OPTS))
    for table, column in late_columns.items():
        if column.name not in {found["name"] for found in inspector.get_columns(table)}:
            ops.add_column(table, column)
            log.info("saga store schema: added column %s.%s", table, column.name)
    return True
