"""The asyncpg connection under a SQLAlchemy one: statements as asyncpg takes them, errors
as SQLAlchemy raises them.

The PostgreSQL store's hot path (the writer's transactions, `_postgres`) runs on
asyncpg itself: through SQLAlchemy's execution layer each statement cost more
CPU than asyncpg's own work for it. A `Statement` is written with `:name`
parameters, as for SQLAlchemy, and numbered `$n` once; asyncpg prepares it once
per connection. What fails on the way is raised as SQLAlchemy's `DBAPIError`
(`connection_invalidated` when the server ended the connection), and a
connection found ended is reported to SQLAlchemy through a statement of its own,
so that its pool drops it and every connection opened before it, as it does by
itself.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["Connection", "Statement", "as_dbapi_error", "connection", "forget_if_lost", "run"]

_PARAMETER: Final = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class Statement:
    """A statement as asyncpg takes it: its `:name` parameters numbered `$n`, bound in the
    order of `names` (for a set-based statement, each an array, one per column)."""

    __slots__ = ("fetches", "names", "returns", "sql")

    def __init__(self, sql: str) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match[1] not in names:
                names.append(match[1])
            return f"${names.index(match[1]) + 1}"

        self.sql = _PARAMETER.sub(number, sql)
        self.names = tuple(names)
        self.returns = " RETURNING " in sql
        """Whether it returns the keys of the rows it wrote."""
        self.fetches = self.returns or sql.startswith("SELECT ")
        """Whether it returns rows at all."""


@dataclass(frozen=True, slots=True)
class Connection:
    """The writer's connection: SQLAlchemy's, and the asyncpg connection under it, which
    runs the batch's transaction."""

    sa: AsyncConnection
    driver: Any


async def connection(conn: AsyncConnection) -> Connection:
    """The asyncpg connection under `conn` (checked out of SQLAlchemy's pool)."""
    driver = (await conn.get_raw_connection()).driver_connection
    if driver is None:  # only after the connection was invalidated
        raise RuntimeError("the PostgreSQL connection is gone")
    return Connection(conn, driver)


async def forget_if_lost(conn: Connection) -> None:
    """When the asyncpg connection is closed (the server ended it), have SQLAlchemy learn it as
    it would by itself, from a statement of its own: it then drops this connection, and every
    pooled one opened before it (a server restart ended them all)."""
    if conn.driver.is_closed():
        with contextlib.suppress(DBAPIError, OSError):
            await conn.sa.exec_driver_sql("SELECT 1")


def as_dbapi_error(exc: Exception, *, lost: bool) -> StatementError:
    """`exc`, raised by asyncpg, as SQLAlchemy would have raised it (`connection_invalidated`
    when the connection was `lost`)."""
    return DBAPIError.instance(
        None, None, exc, Exception, hide_parameters=True, connection_invalidated=lost
    )


async def run(conn: Connection, statement: Statement, args: Sequence[Any]) -> tuple[int, list[Any]]:
    """Run `statement` on the asyncpg connection: how many rows it touched, and the rows it
    returned. A failure is raised as SQLAlchemy raises it (`connection_invalidated` when the
    connection is lost)."""
    driver = conn.driver
    try:
        if statement.fetches:
            rows = await driver.fetch(statement.sql, *args)
            return len(rows), rows
        status: str = await driver.execute(statement.sql, *args)
        count = status.rsplit(" ", 1)[-1]
        return (int(count) if count.isdigit() else 0), []
    except Exception as exc:
        raise as_dbapi_error(exc, lost=driver.is_closed()) from exc
