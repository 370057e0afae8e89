"""The saga store's migrations (`orchestrator.store.sql._migrate`), on SQLite and PostgreSQL.

The databases come from tests/support/databases.py (`store_url`: a SQLite file
per test, a PostgreSQL database per module). "Old" databases are loaded from
tests/data: sagas the store wrote before it had migrations (see the README
there). The runner gets engines built as `SqlSagaStore` builds its own: SQLite
connections in WAL mode with `isolation_level=None`, so the runner begins its
transactions itself. Replicas starting together are processes of their own
(tests/support/migration_replica.py), so that only the database's lock can
keep them from migrating twice.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg  # type: ignore[import-untyped]
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.schema import DefaultClause

from orchestrator.store.sql import _schema
from orchestrator.store.sql._migrate import UnknownRevisionError, upgrade
from tests.support.databases import admin_url, create_database, drop_database
from tests.support.migration_replica import engine_like_the_store

pytestmark = pytest.mark.timeout(60)

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
REPLICAS = 4
HEAD = "0004"
GRACE = timedelta(seconds=300)
OPEN = {"RUNNING", "COMPENSATING"}
FINISHED = {"COMPLETED", "COMPENSATED", "COMPENSATION_FAILED"}

OLD_KEYS = {
    # (facade, request_id) of each saga in the dumps, as the upgrade must key it.
    ("SyncBooking", "shared-1"),
    ("AsyncBooking", "shared-1"),
    ("SyncBooking", "compensated-1"),
    ("SyncBooking", "running-1"),
    ("SyncBooking", "order/42"),
    ("AsyncBooking", "SyncBooking/x"),
    ("AsyncBooking", "compensating-1"),
    ("AsyncBooking", "compensation-failed-1"),
    ("SyncBooking", "unscoped-1"),
}

SAGA_COLUMNS = (
    "kind, state, payload, payload_hash, data, data_at, owner, error_code, error_reason,"
    " created_at, updated_at"
)
"""The columns a saga keeps as they were, after its key (deadline_at is new)."""
STEP_COLUMNS = ("idx", "name", "state", "attempts", "started_at", "finished_at", "error", "data")
"""The columns a step keeps as they were, after its saga's key."""


# --- databases ------------------------------------------------------------------------------------


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_path(url: str) -> str:
    return make_url(url).database or ""


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
async def database(store_url: str) -> str:
    """An empty database: a SQLite file already in WAL mode (as the store leaves it on its
    first opening, so replicas' engines need not race to switch it), or PostgreSQL's."""
    if _is_sqlite(store_url):
        async with aiosqlite.connect(_sqlite_path(store_url)) as conn:
            await conn.execute("PRAGMA journal_mode=WAL")
    return store_url


async def _load_old_dump(url: str) -> None:
    if _is_sqlite(url):
        dump = (DATA / "store_before_migrations.sqlite.sql").read_text()
        async with aiosqlite.connect(_sqlite_path(url)) as conn:
            await conn.executescript(dump)
        return
    dump = (DATA / "store_before_migrations.postgresql.sql").read_text()
    conn = await asyncpg.connect(_dsn(url), timeout=5)
    try:
        await conn.execute(dump)
    finally:
        await conn.close()


@pytest.fixture
async def old_database(database: str) -> str:
    """A database the store wrote before it had migrations (tests/data)."""
    await _load_old_dump(database)
    return database


@pytest.fixture
async def other_database(database: str, tmp_path: Path) -> AsyncIterator[str]:
    """A second empty database on the same backend: another SQLite file, or another
    PostgreSQL database on the same server (dropped after the test)."""
    if _is_sqlite(database):
        path = tmp_path / "other.db"
        async with aiosqlite.connect(path) as conn:
            await conn.execute("PRAGMA journal_mode=WAL")
        yield f"sqlite+aiosqlite:///{path}"
        return
    created = await create_database(admin_url())
    try:
        yield created.render_as_string(hide_password=False)
    finally:
        await drop_database(admin_url(), created)


@pytest.fixture
async def open_engine(database: str) -> AsyncIterator[Callable[[], AsyncEngine]]:
    """Engines on the test's database, one per replica; all disposed after the test."""
    engines: list[AsyncEngine] = []

    def open_() -> AsyncEngine:
        engine = engine_like_the_store(database)
        engines.append(engine)
        return engine

    yield open_
    for engine in engines:
        await engine.dispose()


@pytest.fixture
def engine(open_engine: Callable[[], AsyncEngine]) -> AsyncEngine:
    """An engine on the test's database, built like the store's."""
    return open_engine()


async def _rows(engine: AsyncEngine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        return [tuple(row) for row in await conn.execute(text(sql), params)]


# --- what a database holds ------------------------------------------------------------------------


def _strip(facade: str, request_id: str) -> str:
    prefix = f"{facade}/"
    return request_id[len(prefix) :] if request_id.startswith(prefix) else request_id


async def _old_contents(engine: AsyncEngine) -> dict[str, list[tuple[Any, ...]]]:
    """The old tables' rows, each as the upgrade must leave it (raw values)."""
    sagas = await _rows(engine, f"SELECT request_id, facade, {SAGA_COLUMNS} FROM sagas")
    steps = await _rows(
        engine,
        "SELECT sagas.facade, steps.request_id, "
        + ", ".join(f"steps.{column}" for column in STEP_COLUMNS)
        + " FROM saga_steps AS steps JOIN sagas ON sagas.request_id = steps.request_id",
    )
    return {
        "sagas": sorted((row[1], _strip(row[1], row[0]), *row[2:]) for row in sagas),
        "saga_steps": sorted(
            (row[0], _strip(row[0], row[1]), *row[2:], "", None, "") for row in steps
        ),
        "replicas": sorted(await _rows(engine, "SELECT owner, heartbeat_at FROM replicas")),
    }


async def _new_contents(engine: AsyncEngine) -> dict[str, list[tuple[Any, ...]]]:
    """The new tables' rows (raw values), sagas without their deadline."""
    return {
        "sagas": sorted(
            await _rows(engine, f"SELECT facade, request_id, {SAGA_COLUMNS} FROM sagas")
        ),
        "saga_steps": sorted(
            await _rows(
                engine,
                "SELECT sagas.facade, sagas.request_id, "
                + ", ".join(f"steps.{column}" for column in STEP_COLUMNS)
                + ", steps.compensation, steps.compensated_at, steps.compensation_error"
                " FROM saga_steps AS steps JOIN sagas ON sagas.id = steps.saga_id",
            )
        ),
        "replicas": sorted(await _rows(engine, "SELECT owner, heartbeat_at FROM replicas")),
    }


def _structure(conn: Connection) -> dict[str, Any]:
    """Every table's columns, primary key, indexes (with their conditions) and constraints,
    as the database itself describes them."""
    inspector = inspect(conn)
    tables: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        if table == "alembic_version":
            continue
        indexes = []
        for index in sorted(inspector.get_indexes(table), key=lambda found: found["name"] or ""):
            options = index.get("dialect_options", {})
            where = options.get("sqlite_where", options.get("postgresql_where"))
            indexes.append(
                (
                    index["name"],
                    index["column_names"],
                    bool(index["unique"]),
                    getattr(where, "text", where),
                )
            )
        tables[table] = {
            "columns": [
                (
                    column["name"],
                    str(column["type"].compile(dialect=conn.dialect)),
                    column["nullable"],
                    column.get("default"),
                )
                for column in inspector.get_columns(table)
            ],
            "primary_key": inspector.get_pk_constraint(table),
            "indexes": indexes,
            "unique": inspector.get_unique_constraints(table),
            "foreign_keys": inspector.get_foreign_keys(table),
        }
    return tables


def _defaults_differ(  # noqa: PLR0917 (Alembic calls it with these, positionally)
    context: MigrationContext,
    inspected_column: Any,
    metadata_column: Any,
    inspected_default: str | None,
    metadata_default: DefaultClause | None,
    rendered_metadata_default: str | None,
) -> bool | None:
    """Alembic's SQLite comparison of server defaults strips the quotes of a non-empty
    string only, so `DEFAULT ''` would always differ from `server_default=""`: compare the
    SQL literal there. Elsewhere (None) Alembic's own comparison stands; PostgreSQL's asks
    the server whether the two defaults are equal."""
    if context.dialect.name != "sqlite" or metadata_default is None:
        return None
    if not isinstance(metadata_default.arg, str):
        return None
    literal = "'" + metadata_default.arg.replace("'", "''") + "'"
    # Reflected as SQLite's table_info gives it, which Alembic then wraps in parentheses.
    return re.sub(r"^\((.*)\)$", r"\1", inspected_default or "") != literal


def _differences_from_schema(conn: Connection) -> list[Any]:
    """What Alembic's autogenerate would change to make the database `_schema.metadata`."""
    context = MigrationContext.configure(
        conn,
        opts={
            "compare_type": True,
            "compare_server_default": _defaults_differ,
            "include_name": lambda name, kind, _parent: (
                not (kind == "table" and name == "alembic_version")
            ),
        },
    )
    return list(compare_metadata(context, _schema.metadata))


async def _snapshot(engine: AsyncEngine) -> dict[str, Any]:
    """The database's structure and every row of every table, alembic_version included."""
    async with engine.connect() as conn:
        structure = await conn.run_sync(_structure)
        names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    rows = {}
    for name in sorted(names):
        rows[name] = sorted(await _rows(engine, f"SELECT * FROM {name}"), key=repr)
    return {"structure": structure, "rows": rows}


# --- the tests ------------------------------------------------------------------------------------


async def test_an_old_database_is_upgraded_each_saga_keyed_by_its_facade_and_own_request_id(
    old_database: str, engine: AsyncEngine
) -> None:
    before = await _old_contents(engine)
    assert len(before["sagas"]) == len(OLD_KEYS)

    assert await upgrade(engine) == HEAD

    after = await _new_contents(engine)
    assert {(row[0], row[1]) for row in after["sagas"]} == OLD_KEYS
    assert after == before  # every column of every row, steps' data and errors included
    order = '{"order_id": "o-1"}'
    steps = await _rows(
        engine,
        "SELECT idx, name, steps.state, attempts, error, steps.data FROM saga_steps AS steps"
        " JOIN sagas ON sagas.id = steps.saga_id"
        " WHERE facade = 'SyncBooking' AND request_id = 'compensated-1' ORDER BY idx",
    )
    assert steps == [
        (0, "create_order", "DONE", 1, "", order),
        (1, "create_payment", "FAILED", 1, "payment declined: insufficient funds", order),
    ]
    assert await _rows(engine, "SELECT version_num FROM alembic_version") == [(HEAD,)]


async def test_the_two_sagas_sharing_a_request_id_stay_two_sagas(
    old_database: str, engine: AsyncEngine
) -> None:
    await upgrade(engine)

    sagas = await _rows(
        engine,
        "SELECT facade, kind, payload_hash FROM sagas WHERE request_id = 'shared-1' ORDER BY 1",
    )
    assert [(facade, kind) for facade, kind, _ in sagas] == [
        ("AsyncBooking", "async"),
        ("SyncBooking", "sync"),
    ]
    assert sagas[0][2] != sagas[1][2]
    steps = await _rows(
        engine,
        "SELECT facade, idx, name FROM saga_steps AS steps JOIN sagas ON sagas.id = steps.saga_id"
        " WHERE request_id = 'shared-1' ORDER BY 1, 2",
    )
    assert steps == [
        ("AsyncBooking", 0, "create_order"),
        ("AsyncBooking", 1, "create_payment"),
        ("SyncBooking", 0, "create_order"),
        ("SyncBooking", 1, "create_payment"),
    ]


async def test_open_sagas_get_a_deadline_and_finished_ones_none(
    old_database: str, engine: AsyncEngine
) -> None:
    started = datetime.now(UTC)
    await upgrade(engine)
    ended = datetime.now(UTC)

    async with engine.connect() as conn:
        found = (
            await conn.execute(
                select(
                    _schema.sagas.c.facade,
                    _schema.sagas.c.request_id,
                    _schema.sagas.c.state,
                    _schema.sagas.c.deadline_at,
                )
            )
        ).all()
    assert {state for _, _, state, _ in found} == OPEN | FINISHED
    for facade, request_id, state, deadline in found:
        if state in FINISHED:
            assert deadline is None, (facade, request_id)
        else:
            assert started + GRACE <= deadline <= ended + GRACE, (facade, request_id)


async def test_sagas_are_numbered_in_the_order_they_were_created_and_new_ones_after_them(
    old_database: str, engine: AsyncEngine
) -> None:
    await upgrade(engine)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO sagas (facade, request_id, kind, state, payload, payload_hash, data,"
                " owner, error_code, error_reason, created_at, updated_at)"
                " SELECT 'SyncBooking', 'after-the-upgrade', kind, state, payload, payload_hash,"
                " data, owner, error_code, error_reason, created_at, updated_at FROM sagas"
                " WHERE request_id = 'running-1'"
            )
        )

    numbered = await _rows(engine, "SELECT id, created_at, request_id FROM sagas ORDER BY id")
    old = [row for row in numbered if row[2] != "after-the-upgrade"]
    assert [row[0] for row in old] == list(range(1, len(OLD_KEYS) + 1))
    assert [row[1] for row in old] == sorted(row[1] for row in old)
    assert numbered[-1][0] == len(OLD_KEYS) + 1
    assert numbered[-1][2] == "after-the-upgrade"


@pytest.mark.parametrize("origin", ["fresh", "old"])
async def test_a_fresh_database_and_an_upgraded_one_both_match_the_schema_exactly(
    origin: str, database: str, engine: AsyncEngine, other_database: str
) -> None:
    if origin == "old":
        await _load_old_dump(database)
    assert await upgrade(engine) == HEAD

    async with engine.connect() as conn:
        assert await conn.run_sync(_differences_from_schema) == []
        migrated = await conn.run_sync(_structure)
    # Alembic compares an index's columns, not a partial index's condition: compare
    # everything the database says about its tables with a database create_all made.
    reference = create_async_engine(other_database)
    try:
        async with reference.begin() as conn:
            await conn.run_sync(_schema.metadata.create_all)
            expected = await conn.run_sync(_structure)
    finally:
        await reference.dispose()
    assert migrated == expected


async def test_upgrading_twice_changes_nothing(old_database: str, engine: AsyncEngine) -> None:
    assert await upgrade(engine) == HEAD
    once = await _snapshot(engine)

    assert await upgrade(engine) == HEAD

    assert await _snapshot(engine) == once


@pytest.mark.parametrize("origin", ["fresh", "old"])
async def test_replicas_upgrading_one_database_at_once_upgrade_it_once(
    origin: str, database: str, engine: AsyncEngine
) -> None:
    if origin == "old":
        await _load_old_dump(database)
    # Replicas are processes: each waits, everything imported, for the cue to upgrade.
    replicas = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.migration_replica",
            database,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        for _ in range(REPLICAS)
    ]
    for replica in replicas:
        assert replica.stdout is not None
        assert await replica.stdout.readline() == b"ready\n"

    outputs = await asyncio.gather(*(replica.communicate(b"go\n") for replica in replicas))

    logs = "".join(err.decode() for _, err in outputs)
    assert [out.decode() for out, _ in outputs] == [f"reached {HEAD}\n"] * REPLICAS, logs
    ran = re.findall(r"Running upgrade (\w*) -> (\w+)", logs)
    upgrades = [("0001", "0002"), ("0002", "0003"), ("0003", "0004")]
    assert ran == ([("", "0001"), *upgrades] if origin == "fresh" else upgrades)
    keys = set(await _rows(engine, "SELECT facade, request_id FROM sagas"))
    assert keys == (OLD_KEYS if origin == "old" else set())


async def test_two_databases_upgraded_at_once_in_one_process_both_reach_the_head(
    database: str, engine: AsyncEngine, other_database: str
) -> None:
    # Alembic's `op` stands for the migration running now, process-wide: two at once
    # must take turns, or each would run its statements on the other's connection.
    other = engine_like_the_store(other_database)
    try:
        reached = await asyncio.gather(upgrade(engine), upgrade(other))
        assert reached == [HEAD, HEAD]
        for each in (engine, other):
            async with each.connect() as conn:
                assert await conn.run_sync(_differences_from_schema) == []
    finally:
        await other.dispose()


async def test_a_database_at_an_unknown_future_revision_is_refused_with_a_clear_error(
    database: str, engine: AsyncEngine
) -> None:
    await upgrade(engine)
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    before = await _snapshot(engine)

    with pytest.raises(UnknownRevisionError) as refused:
        await upgrade(engine)

    message = str(refused.value)
    assert "'0099'" in message
    assert f"'{HEAD}'" in message
    assert "newer version" in message
    assert await _snapshot(engine) == before


async def test_tables_from_before_the_data_columns_get_them_and_are_upgraded(
    old_database: str, engine: AsyncEngine
) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE sagas DROP COLUMN data_at"))
        await conn.execute(text("ALTER TABLE saga_steps DROP COLUMN data"))

    assert await upgrade(engine) == HEAD

    assert set(await _rows(engine, "SELECT facade, request_id FROM sagas")) == OLD_KEYS
    assert await _rows(engine, "SELECT count(*) FROM sagas WHERE data_at IS NOT NULL") == [(0,)]
    assert await _rows(engine, "SELECT count(*) FROM saga_steps WHERE data IS NOT NULL") == [(0,)]
    assert await _rows(engine, "SELECT count(*) FROM saga_steps") == [(14,)]


async def test_a_migration_that_fails_leaves_the_database_as_it_was(
    old_database: str, engine: AsyncEngine
) -> None:
    # The same saga stored once with its facade's prefix and once without: one new key.
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO sagas (request_id, facade, kind, state, payload, payload_hash, data,"
                " data_at, owner, error_code, error_reason, created_at, updated_at)"
                " SELECT 'shared-1', facade, kind, state, payload, payload_hash, data, data_at,"
                " owner, error_code, error_reason, created_at, updated_at FROM sagas"
                " WHERE request_id = 'SyncBooking/shared-1'"
            )
        )
    before = await _snapshot(engine)

    with pytest.raises(RuntimeError, match=r"'SyncBooking'.*'shared-1'"):
        await upgrade(engine)

    after = await _snapshot(engine)
    assert "alembic_version" not in after["rows"]
    assert after == before
