"""Operator actions on sagas, and the dead-letter list.

Adds `saga_actions` (what operators did to each saga: who, when, why) and
`dead_letters` (messages that left their topic for good, kept with their
reason until an operator replays or discards them). Existing tables do not
change: a saga's new state RESOLVED fits the `state` column as it is.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_MAX_REQUEST_ID = 128
_MAX_NAME = 128


def _utc_datetime() -> sa.types.TypeEngine[datetime]:
    """The store's UtcDateTime as DDL: TIMESTAMPTZ, or VARCHAR(26) on SQLite."""
    return sa.DateTime(timezone=True).with_variant(sa.String(26), "sqlite")


def upgrade() -> None:
    """Create both tables and their indexes."""
    op.create_table(
        "saga_actions",
        sa.Column("facade", sa.String(_MAX_NAME), primary_key=True),
        sa.Column("request_id", sa.String(_MAX_REQUEST_ID), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(_MAX_NAME), nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("at", _utc_datetime(), nullable=False),
        sa.Column("dead_letter_id", sa.String(64), nullable=False, server_default=""),
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("topic", sa.String(_MAX_NAME), nullable=False),
        sa.Column("facade", sa.String(_MAX_NAME), nullable=False),
        sa.Column("request_id", sa.String(_MAX_REQUEST_ID), nullable=False),
        sa.Column("step", sa.String(_MAX_NAME), nullable=False),
        sa.Column("message_id", sa.String(512), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("headers", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("delivery_count", sa.Integer, nullable=False),
        sa.Column("dead_lettered_at", _utc_datetime(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("settled_at", _utc_datetime(), nullable=True),
        sa.Column("settled_by", sa.String(_MAX_NAME), nullable=False, server_default=""),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
    )
    op.create_index("ix_dead_letters_listing", "dead_letters", ["state", "dead_lettered_at", "id"])
    op.create_index("ix_dead_letters_saga", "dead_letters", ["facade", "request_id"])


def downgrade() -> None:
    """Not supported: restore the backup taken before upgrading."""
    raise NotImplementedError("the saga store's migrations go forward only")
