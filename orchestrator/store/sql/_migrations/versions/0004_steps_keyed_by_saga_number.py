"""Sagas get a number; their steps are keyed by it rather than by the saga's request id.

`sagas` gains `id`, its new primary key (SQLite's row id; BIGSERIAL on
PostgreSQL), numbered here in the order the sagas were created, and keeps its
name `(facade, request_id)` as a unique constraint (`uq_sagas_key`).
`saga_steps` loses `facade` and `request_id` for `saga_id`, the number of its
saga, and is keyed by `(saga_id, idx)`. Every other column of both tables
keeps its values.

Why: a key that starts with a random request id puts each saga's steps in a
leaf page of their own, which every commit of that saga writes again (to
SQLite's WAL, then to the database; PostgreSQL's first write of a page after
a checkpoint logs all of it). Numbers given as sagas begin put the steps of
sagas in flight together into a few pages that their commits share.

Both tables are recreated (create new, copy, drop old, rename), in the
migration's one transaction, as 0002 did; the indexes are created last, under
their final names, once the old tables (and their indexes) are gone. Steps
whose saga is missing are not carried over (logged). `saga_actions` and
`dead_letters` still name a saga by its key: an operator's action or a dead
letter is rare, and may name a saga the store does not have.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import logging
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

log = logging.getLogger("orchestrator.store.sql")

_MAX_REQUEST_ID = 128
_MAX_NAME = 128
_RUNNING_ONLY = "state = 'RUNNING'"
_OPEN_ONLY = "state IN ('RUNNING', 'COMPENSATING')"
_SAGA_COLUMNS = (
    "facade, request_id, kind, state, payload, payload_hash, data, data_at, owner,"
    " error_code, error_reason, created_at, updated_at, deadline_at"
)
_STEP_COLUMNS = (
    "idx",
    "name",
    "state",
    "attempts",
    "started_at",
    "finished_at",
    "error",
    "data",
    "compensation",
    "compensated_at",
    "compensation_error",
)


def _utc_datetime() -> sa.types.TypeEngine[datetime]:
    """The store's UtcDateTime as DDL: TIMESTAMPTZ, or VARCHAR(26) on SQLite."""
    return sa.DateTime(timezone=True).with_variant(sa.String(26), "sqlite")


def _number() -> sa.types.TypeEngine[int]:
    """A saga's number: INTEGER on SQLite (a primary key of that type is the row id)."""
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _primary_key(table: str, *columns: str) -> sa.PrimaryKeyConstraint:
    # PostgreSQL names it after the table, and renaming the table keeps the name: the new
    # table's gets a name of its own here, and the final one once the old table is gone.
    # SQLite's primary keys have no name to fix.
    name = f"{table}_new_pkey" if op.get_bind().dialect.name == "postgresql" else None
    return sa.PrimaryKeyConstraint(*columns, name=name)


def upgrade() -> None:
    """Recreate `sagas` with numbers and `saga_steps` keyed by them, copying every row."""
    conn = op.get_bind()
    op.create_table(
        "sagas_new",
        sa.Column("id", _number(), autoincrement=True, nullable=False),
        sa.Column("facade", sa.String(_MAX_NAME), nullable=False),
        sa.Column("request_id", sa.String(_MAX_REQUEST_ID), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("payload_hash", sa.String(128), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("data_at", _utc_datetime(), nullable=True),
        sa.Column("owner", sa.String(_MAX_NAME), nullable=False),
        sa.Column("error_code", sa.String(_MAX_NAME), nullable=False),
        sa.Column("error_reason", sa.Text, nullable=False),
        sa.Column("created_at", _utc_datetime(), nullable=False),
        sa.Column("updated_at", _utc_datetime(), nullable=False),
        sa.Column("deadline_at", _utc_datetime(), nullable=True),
        _primary_key("sagas", "id"),
        # Not among the old table's names (its key is its primary key, sagas_pkey): this
        # one is final from the start.
        sa.UniqueConstraint("facade", "request_id", name="uq_sagas_key"),
    )
    op.create_table(
        "saga_steps_new",
        sa.Column("saga_id", _number(), nullable=False, autoincrement=False),
        sa.Column("idx", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("name", sa.String(_MAX_NAME), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("started_at", _utc_datetime(), nullable=False),
        sa.Column("finished_at", _utc_datetime(), nullable=True),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("data", sa.Text, nullable=True),
        sa.Column("compensation", sa.String(16), nullable=False, server_default=""),
        sa.Column("compensated_at", _utc_datetime(), nullable=True),
        sa.Column("compensation_error", sa.Text, nullable=False, server_default=""),
        _primary_key("saga_steps", "saga_id", "idx"),
    )

    conn.execute(
        sa.text(
            f"INSERT INTO sagas_new ({_SAGA_COLUMNS}) SELECT {_SAGA_COLUMNS} FROM sagas"
            " ORDER BY created_at, facade, request_id"
        )
    )
    conn.execute(
        sa.text(
            f"INSERT INTO saga_steps_new (saga_id, {', '.join(_STEP_COLUMNS)})"
            " SELECT sagas_new.id, "
            + ", ".join(f"steps.{column}" for column in _STEP_COLUMNS)
            + " FROM saga_steps AS steps JOIN sagas_new ON sagas_new.facade = steps.facade"
            " AND sagas_new.request_id = steps.request_id"
        )
    )
    orphans = conn.execute(
        sa.text(
            "SELECT count(*) FROM saga_steps AS steps WHERE NOT EXISTS (SELECT 1 FROM sagas"
            " WHERE sagas.facade = steps.facade AND sagas.request_id = steps.request_id)"
        )
    ).scalar_one()
    if orphans:
        log.warning("saga store migration 0004: %d step(s) of no saga were left behind", orphans)

    for table in ("saga_steps", "sagas"):
        op.drop_table(table)
        op.rename_table(f"{table}_new", table)
        if conn.dialect.name == "postgresql":
            op.execute(f"ALTER TABLE {table} RENAME CONSTRAINT {table}_new_pkey TO {table}_pkey")
    if conn.dialect.name == "postgresql":
        # The number's sequence was named after the new table, and a fresh database's is
        # named after `sagas`; it goes on counting from the last number copied.
        op.execute("ALTER SEQUENCE sagas_new_id_seq RENAME TO sagas_id_seq")

    op.create_index("ix_sagas_listing", "sagas", ["facade", "state", "created_at", "request_id"])
    op.create_index("ix_sagas_created", "sagas", ["created_at", "facade", "request_id"])
    op.create_index(
        "ix_sagas_running",
        "sagas",
        ["kind", "owner"],
        sqlite_where=sa.text(_RUNNING_ONLY),
        postgresql_where=sa.text(_RUNNING_ONLY),
    )
    op.create_index(
        "ix_sagas_deadline",
        "sagas",
        ["deadline_at"],
        sqlite_where=sa.text(_OPEN_ONLY),
        postgresql_where=sa.text(_OPEN_ONLY),
    )


def downgrade() -> None:
    """Not supported: restore the backup taken before upgrading."""
    raise NotImplementedError("the saga store's migrations go forward only")
