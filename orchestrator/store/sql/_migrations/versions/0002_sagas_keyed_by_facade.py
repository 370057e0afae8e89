"""Sagas keyed by (facade, request_id), with deadlines; steps with their compensation.

The old key `"<facade>/<request id>"` is split: a saga whose `request_id`
starts with its `facade` and a slash loses that prefix, any other keeps its id
(the prefix is stripped once: `"f/f/x"` of facade `f` becomes `"f/x"`). Its
steps take the saga's facade and new id, and start with nothing to compensate
(`compensation` and `compensation_error` empty, `compensated_at` NULL).

`deadline_at` is NULL for finished sagas (COMPLETED, COMPENSATED,
COMPENSATION_FAILED) and, for open ones (RUNNING, COMPENSATING), the moment of
the migration plus `OPEN_SAGA_GRACE`: recovery eventually looks at the sagas the
old version left open.

Both tables are recreated (create new, copy, drop old, rename), which both
SQLite and PostgreSQL do in a transaction; the indexes are created last, under
their final names, once the old tables (and their indexes) are gone. Steps
whose saga is missing are not carried over (logged); two old sagas that would
get one key, or an id longer than the new column, stop the migration with an
error naming them. `replicas` does not change.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

log = logging.getLogger("orchestrator.store.sql")

OPEN_SAGA_GRACE = timedelta(seconds=300)
"""How long after the migration an open saga's deadline falls."""
_MAX_REQUEST_ID = 128
_MAX_NAME = 128
_RUNNING_ONLY = "state = 'RUNNING'"
_OPEN_ONLY = "state IN ('RUNNING', 'COMPENSATING')"


def _new_id() -> str:
    """An old saga's `request_id` without its `"<facade>/"` prefix, as SQL over the old
    table `sagas` (compared as text, not with LIKE: a facade's name may hold `_` or `%`)."""
    request_id, facade = "sagas.request_id", "sagas.facade"
    return (
        f"CASE WHEN substr({request_id}, 1, length({facade}) + 1) = {facade} || '/'"
        f" THEN substr({request_id}, length({facade}) + 2) ELSE {request_id} END"
    )


def _utc_datetime() -> sa.types.TypeEngine[datetime]:
    """The store's UtcDateTime as DDL: TIMESTAMPTZ, or VARCHAR(26) on SQLite."""
    return sa.DateTime(timezone=True).with_variant(sa.String(26), "sqlite")


def _primary_key(table: str, *columns: str) -> sa.PrimaryKeyConstraint:
    # PostgreSQL names it after the table, and renaming the table keeps the name: the new
    # table's gets a name of its own here, and the final one once the old table is gone.
    # SQLite's primary keys have no name to fix.
    name = f"{table}_new_pkey" if op.get_bind().dialect.name == "postgresql" else None
    return sa.PrimaryKeyConstraint(*columns, name=name)


def _check_keys(conn: sa.Connection) -> None:
    """Stop before copying if the new keys would not fit or not be unique."""
    too_long = conn.execute(
        sa.text(
            f"SELECT facade, request_id FROM sagas WHERE length({_new_id()}) > :most"
            " ORDER BY facade, request_id"
        ),
        {"most": _MAX_REQUEST_ID},
    ).all()
    if too_long:
        raise RuntimeError(
            f"saga store migration 0002: {len(too_long)} saga(s) would keep a request id longer "
            f"than {_MAX_REQUEST_ID} characters, e.g. {tuple(too_long[0])!r}"
        )
    clashes = conn.execute(
        sa.text(
            f"SELECT facade, new_id, count(*) FROM (SELECT facade, {_new_id()} AS new_id"
            " FROM sagas) AS keyed GROUP BY facade, new_id HAVING count(*) > 1"
            " ORDER BY facade, new_id"
        )
    ).all()
    if clashes:
        facade, new_id, count = clashes[0]
        raise RuntimeError(
            f"saga store migration 0002: {len(clashes)} key(s) would be shared by several "
            f"sagas, e.g. {count} sagas of facade {facade!r} would all get request id "
            f"{new_id!r} (one stored with the facade's prefix, one without)"
        )


def _deadline(conn: sa.Connection) -> datetime | str:
    """Now plus the grace, as `deadline_at` keeps it on this backend."""
    at = datetime.now(UTC) + OPEN_SAGA_GRACE
    if conn.dialect.name == "sqlite":
        return at.replace(tzinfo=None).isoformat(" ", "microseconds")
    return at


def upgrade() -> None:
    """Recreate `sagas` and `saga_steps` under the new keys, copying every row."""
    conn = op.get_bind()
    _check_keys(conn)

    op.create_table(
        "sagas_new",
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
        _primary_key("sagas", "facade", "request_id"),
    )
    op.create_table(
        "saga_steps_new",
        sa.Column("facade", sa.String(_MAX_NAME), nullable=False),
        sa.Column("request_id", sa.String(_MAX_REQUEST_ID), nullable=False),
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
        _primary_key("saga_steps", "facade", "request_id", "idx"),
    )

    deadline = sa.bindparam("deadline", _deadline(conn), type_=_utc_datetime())
    conn.execute(
        sa.text(
            "INSERT INTO sagas_new (facade, request_id, kind, state, payload, payload_hash,"
            " data, data_at, owner, error_code, error_reason, created_at, updated_at,"
            " deadline_at)"
            f" SELECT facade, {_new_id()}, kind, state, payload, payload_hash,"
            " data, data_at, owner, error_code, error_reason, created_at, updated_at,"
            f" CASE WHEN {_OPEN_ONLY} THEN :deadline ELSE NULL END"
            " FROM sagas"
        ).bindparams(deadline)
    )
    conn.execute(
        sa.text(
            "INSERT INTO saga_steps_new (facade, request_id, idx, name, state, attempts,"
            " started_at, finished_at, error, data, compensation, compensated_at,"
            " compensation_error)"
            f" SELECT sagas.facade, {_new_id()},"
            " steps.idx, steps.name, steps.state, steps.attempts, steps.started_at,"
            " steps.finished_at, steps.error, steps.data, '', NULL, ''"
            " FROM saga_steps AS steps JOIN sagas ON sagas.request_id = steps.request_id"
        )
    )
    orphans = conn.execute(
        sa.text(
            "SELECT count(*) FROM saga_steps AS steps WHERE NOT EXISTS"
            " (SELECT 1 FROM sagas WHERE sagas.request_id = steps.request_id)"
        )
    ).scalar_one()
    if orphans:
        log.warning("saga store migration 0002: %d step(s) of no saga were left behind", orphans)

    for table in ("saga_steps", "sagas"):
        op.drop_table(table)
        op.rename_table(f"{table}_new", table)
        if conn.dialect.name == "postgresql":
            op.execute(f"ALTER TABLE {table} RENAME CONSTRAINT {table}_new_pkey TO {table}_pkey")

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
