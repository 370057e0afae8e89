"""The baseline: the saga store's tables as the orchestrator made them before migrations.

Sagas are keyed by a string `request_id`, which the facades filled with
`"<facade>/<request id>"`; their steps by that key and their index; replicas
by owner. Timestamps are TIMESTAMPTZ on PostgreSQL and fixed-width naive UTC
text (`VARCHAR(26)`) on SQLite, as the store's `UtcDateTime` keeps them.

A database the old code made (these tables, no `alembic_version`) is stamped
with this revision by `_migrate.upgrade`, after it adds the nullable columns an
even earlier version lacked (`sagas.data_at`, `saga_steps.data`).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_RUNNING_ONLY = "state = 'RUNNING'"


def _utc_datetime() -> sa.types.TypeEngine[datetime]:
    """The store's UtcDateTime as DDL: TIMESTAMPTZ, or VARCHAR(26) on SQLite."""
    return sa.DateTime(timezone=True).with_variant(sa.String(26), "sqlite")


def upgrade() -> None:
    """Create the three tables and their indexes."""
    op.create_table(
        "sagas",
        sa.Column("request_id", sa.String(300), primary_key=True),
        sa.Column("facade", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("payload_hash", sa.String(128), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("data_at", _utc_datetime(), nullable=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("error_code", sa.String(128), nullable=False),
        sa.Column("error_reason", sa.Text, nullable=False),
        sa.Column("created_at", _utc_datetime(), nullable=False),
        sa.Column("updated_at", _utc_datetime(), nullable=False),
    )
    op.create_index("ix_sagas_listing", "sagas", ["facade", "state", "created_at", "request_id"])
    op.create_index("ix_sagas_created", "sagas", ["created_at", "request_id"])
    op.create_index(
        "ix_sagas_running",
        "sagas",
        ["kind", "owner"],
        sqlite_where=sa.text(_RUNNING_ONLY),
        postgresql_where=sa.text(_RUNNING_ONLY),
    )
    op.create_table(
        "saga_steps",
        sa.Column("request_id", sa.String(300), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("started_at", _utc_datetime(), nullable=False),
        sa.Column("finished_at", _utc_datetime(), nullable=True),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("data", sa.Text, nullable=True),
    )
    op.create_table(
        "replicas",
        sa.Column("owner", sa.String(128), primary_key=True),
        sa.Column("heartbeat_at", _utc_datetime(), nullable=False),
    )


def downgrade() -> None:
    """Not supported: restore the backup taken before upgrading."""
    raise NotImplementedError("the saga store's migrations go forward only")
