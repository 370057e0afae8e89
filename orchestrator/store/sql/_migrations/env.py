"""Alembic's environment: the revisions run on the connection `_migrate.upgrade` hands over.

That connection is already in the transaction that holds the migration lock,
so the revisions join it (both backends have transactional DDL): the whole
upgrade commits or rolls back as one. There is no offline (SQL script) mode.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError(
        "the saga store's migrations run through orchestrator.store.sql._migrate.upgrade, "
        "on the connection it hands over in config.attributes['connection']"
    )
context.configure(connection=connection, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
