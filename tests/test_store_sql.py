"""SqlSagaStore on SQLite and PostgreSQL: its writers, group commit, paging and migrations.

The databases come from tests/support/databases.py (`store_url`, `open_store`,
`store`): a SQLite file per test, and a PostgreSQL database per module on
`$ORCH_TEST_POSTGRES_URL`'s server (default postgres@127.0.0.1:5432), skipped
when unreachable unless `$CI` is set. The journal's semantics, on every store,
are in tests/test_store.py; the migrations themselves in tests/test_migrations.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import create_async_engine

from orchestrator.store import (
    CompensationEnded,
    InMemorySagaStore,
    NewSaga,
    Position,
    SagaPage,
    SagaRecord,
    SagaState,
    SagaStore,
    SqlSagaStore,
    StepEnded,
    StepState,
    store_from_url,
)
from orchestrator.store.sql import _plans as sql_plans
from orchestrator.store.sql import _postgres as sql_postgres
from orchestrator.store.sql import _sqlite as sql_sqlite
from orchestrator.store.sql._asyncpg import Statement
from orchestrator.store.sql._migrate import alembic_config
from orchestrator.store.sql._ops import JournalBroken, Op
from orchestrator.store.sql._postgres_writer import PostgresWriter

if TYPE_CHECKING:
    from tests.support.databases import StoreOpener

pytestmark = pytest.mark.timeout(60)

FACADE = "booking"
DATA = Path(__file__).parent / "data"


def new_saga(request_id: str, *, facade: str = FACADE, owner: str = "replica-a") -> NewSaga:
    return NewSaga(
        facade=facade,
        request_id=request_id,
        kind="sync",
        payload='{"hotel": "h1"}',
        payload_hash="hash-h1",
        owner=owner,
        first_step="step-0",
        deadline_at=datetime.now(UTC) + timedelta(minutes=5),
    )


async def begin(store: SagaStore, request_id: str, **saga: Any) -> bool:
    """Whether the begin created the saga."""
    return await store.begin(new_saga(request_id, **saga)) is None


async def run_saga(store: SagaStore, request_id: str, *, facade: str = FACADE) -> None:
    """A two-step sync saga's three writes: its begin, step 0's end with step 1's start,
    step 1's end with the saga COMPLETED."""
    assert await begin(store, request_id, facade=facade)
    first = StepEnded(0, f'{{"{request_id}": 0}}', next_step="step-1")
    last = StepEnded(1, f'{{"{request_id}": 1}}', complete=True)
    assert await store.apply(facade, request_id, first)
    assert await store.apply(facade, request_id, last)


async def get(store: SagaStore, request_id: str, *, facade: str = FACADE) -> SagaRecord:
    saga = await store.get(facade, request_id)
    assert saga is not None, (facade, request_id)
    return saga


def ids(page: SagaPage) -> list[str]:
    return [saga.request_id for saga in page.sagas]


async def execute(url: str, statement: str) -> list[Any]:
    """`statement` on a connection of its own, behind the store's back; its rows."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(statement))
            return list(result) if result.returns_rows else []
    finally:
        await engine.dispose()


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


# --- group commit and its failures ----------------------------------------------------------------


async def test_group_commit_makes_200_concurrent_sagas_durable(open_store: StoreOpener) -> None:
    store = await open_store()
    request_ids = [f"saga-{i:03d}" for i in range(200)]

    await asyncio.gather(*(run_saga(store, request_id) for request_id in request_ids))
    await store.close()

    # Three writes a saga, far fewer transactions.
    assert store.stats.ops == 3 * len(request_ids)
    assert store.stats.transactions < len(request_ids)
    assert store.stats.largest_batch > 1
    reopened = await open_store()
    page = await reopened.list_sagas(page_size=500)
    assert sorted(ids(page)) == request_ids
    for saga in page.sagas:
        assert (saga.state, saga.data) == (SagaState.COMPLETED, f'{{"{saga.request_id}": 1}}')
        assert [(step.index, step.state, step.attempts) for step in saga.steps] == [
            (0, StepState.DONE, 1),
            (1, StepState.DONE, 1),
        ]


async def test_sqlite_s_statements_count_their_cpu_on_the_loop_and_postgresql_s_count_none(
    store: SqlSagaStore, store_url: str
) -> None:
    """SQLite's statements run on the event loop: the store counts the CPU they take there
    (`WriterStats.loop_seconds`), its batches' and its position reads'. PostgreSQL is reached
    by asynchronous I/O, whose time on the loop is not the store's alone: it counts none."""
    await asyncio.gather(*(run_saga(store, f"saga-{i:02d}") for i in range(50)))
    written = store.stats.loop_seconds
    assert await store.position(FACADE, "saga-00") is not None
    read = store.stats.loop_seconds

    if is_sqlite(store_url):
        assert 0 < written < read
    else:
        assert written == read == 0


async def test_a_bad_write_fails_alone_and_spares_its_batch(
    store: SqlSagaStore, store_url: str
) -> None:
    good = [f"good-{i:02d}" for i in range(30)]
    # Behind the store's back: a COMPENSATING saga whose step 0 is still RUNNING. Ending that
    # step would move it while its saga's row cannot follow: the store refuses to commit
    # that, in the database, mid-batch.
    assert await begin(store, "bad")
    await execute(store_url, "UPDATE sagas SET state = 'COMPENSATING' WHERE request_id = 'bad'")
    write = store.apply(FACADE, "bad", StepEnded(0, "{}", complete=True))

    results = await asyncio.gather(
        *(begin(store, request_id) for request_id in good[:15]),
        write,
        *(begin(store, request_id) for request_id in good[15:]),
        return_exceptions=True,
    )

    assert isinstance(results[15], JournalBroken), results[15]
    assert results[:15] + results[16:] == [True] * 30
    assert store.stats.failed_batches >= 1
    listed = ids(await store.list_sagas(page_size=100))
    assert sorted(listed) == sorted([*good, "bad"])
    (step,) = (await get(store, "bad")).steps
    assert step.state == StepState.RUNNING  # its step's end was rolled back with it


@pytest.fixture
def postgresql_url(store_url: str) -> str:
    """The store's URL, for tests of PostgreSQL's server-side connections (skipped on SQLite)."""
    if is_sqlite(store_url):
        pytest.skip("PostgreSQL's server-side connections")
    return store_url


async def end_the_stores_connections(url: str) -> None:
    """PostgreSQL ends every connection of the store's pools (as a restart, a failover or an
    administrator would); the change feed's is spared."""
    await execute(
        url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid != pg_backend_pid() AND application_name != 'orchestrator-listen'",
    )


async def test_writes_go_on_after_postgresql_drops_the_writer_s_connections(
    store: SqlSagaStore, postgresql_url: str
) -> None:
    await run_saga(store, "before")
    await end_the_stores_connections(postgresql_url)
    outcomes = []
    for attempt in range(5):
        try:
            outcomes.append(await begin(store, f"after-{attempt}"))
        except Exception as exc:
            outcomes.append(exc)
        if outcomes[-1] is True:
            break
    # A write on a dropped connection fails (its caller hears of it); the writer then takes
    # a fresh connection, and nothing half-done was committed.
    assert outcomes[-1] is True, outcomes
    assert all(outcome is True or isinstance(outcome, DBAPIError) for outcome in outcomes)
    await run_saga(store, "later")
    recorded = [f"after-{n}" for n, outcome in enumerate(outcomes) if outcome is True]
    listed = sorted(ids(await store.list_sagas(page_size=100)))
    assert listed == sorted(["before", "later", *recorded])


async def test_reads_go_on_after_postgresql_drops_the_store_s_connections(
    store: SqlSagaStore, postgresql_url: str
) -> None:
    await run_saga(store, "before")
    # Every pooled connection in use at once, so that each is one the server then ends.
    await asyncio.gather(*(store.position(FACADE, "before") for _ in range(20)))
    await end_the_stores_connections(postgresql_url)
    outcomes: list[object] = []
    for _ in range(5):
        try:
            outcomes.append(await store.position(FACADE, "before"))
        except Exception as exc:
            outcomes.append(exc)
        if not isinstance(outcomes[-1], Exception):
            break
    # A read on a dropped connection fails (as SQLAlchemy reports a database's failure); the
    # next one gets a fresh connection.
    assert len(outcomes) <= 2, outcomes
    assert all(isinstance(outcome, DBAPIError) for outcome in outcomes[:-1]), outcomes
    position = outcomes[-1]
    assert isinstance(position, Position), outcomes
    assert position.state == SagaState.COMPLETED


async def test_on_postgresql_a_batch_of_begins_and_step_ends_is_one_statement(
    store: SqlSagaStore, postgresql_url: str
) -> None:
    await run_saga(store, "opened")  # the writer's connection is up
    writer = store._running()
    assert isinstance(writer, PostgresWriter)
    assert writer._connection is not None
    statements: list[str] = []
    writer._connection.driver.add_query_logger(lambda record: statements.append(record.query))
    request_ids = [f"together-{i:02d}" for i in range(24)]

    await asyncio.gather(*(begin(store, request_id) for request_id in request_ids))
    ends = [StepEnded(0, "{}", complete=True) for _ in request_ids]
    applied = await asyncio.gather(
        *(store.apply(FACADE, r, end) for r, end in zip(request_ids, ends, strict=True))
    )

    assert applied == [True] * len(request_ids)
    # Each batch one statement of its own: no BEGIN, no COMMIT, no statement per kind.
    assert statements, "the writer ran nothing"
    assert all(sql.startswith("WITH b AS") for sql in statements), statements
    assert len(statements) < 2 * len(request_ids)
    for request_id in request_ids:
        assert (await get(store, request_id)).state == SagaState.COMPLETED


@pytest.mark.parametrize(
    "name", ["_COMPLETE", "_FAIL", "_COMPENSATION_ENDED", "_CLAIM", "_STEP_DONE", "_STEP_FAILED"]
)
async def test_postgresql_finds_a_compare_and_set_s_saga_by_its_key(
    store: SqlSagaStore, postgresql_url: str, name: str
) -> None:
    # Not by the listing index (facade, state, ...): its RUNNING entries include every
    # finished saga's dead RUNNING versions until a vacuum, which a lookup would walk.
    statement: Statement = getattr(sql_postgres, name)
    await asyncio.gather(*(run_saga(store, f"done-{i:03d}") for i in range(200)))
    dsn = make_url(postgresql_url).set(drivername="postgresql").render_as_string(False)
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute("ANALYZE sagas")  # as a database that has run a while knows it
        await conn.execute("SET enable_seqscan = off")  # a table this small would be scanned
        rows = await conn.fetch(f"EXPLAIN {statement.sql}", *example_arguments(statement))
    finally:
        await conn.close()
    plan = "\n".join(row[0] for row in rows)

    assert "on sagas" in plan and "uq_sagas_key" in plan, plan
    assert "ix_sagas_listing" not in plan, plan


async def test_a_store_started_on_empty_tables_still_finds_rows_by_key_once_they_fill(
    store: SqlSagaStore, postgresql_url: str
) -> None:
    # Batches of a dozen sagas, more than five times over: PostgreSQL may then keep, for the
    # connection's life, a generic plan of each statement made while the tables were empty,
    # which reads a whole table or index (as cheap as any other plan then).
    for batch in range(8):
        await asyncio.gather(*(run_saga(store, f"early-{batch}-{i}") for i in range(12)))
    await fill_with_finished_sagas(postgresql_url, FILLED)
    # A server process reports its statistics as a transaction ends at least a second after
    # it last did (else after ten idle seconds): the writer's next write reports them all.
    await asyncio.sleep(1.1)
    await store.heartbeat("replica-a")
    before = await work_done(postgresql_url, recorded=FILLED + 8 * 12, steps_ended=2 * 8 * 12)
    for batch in range(2):
        await asyncio.gather(*(run_saga(store, f"late-{batch}-{i}") for i in range(12)))
        await asyncio.gather(*(store.get(FACADE, f"late-{batch}-{i}") for i in range(12)))
    await store.close()  # its server processes end, and report what they read
    after = await work_done(postgresql_url, recorded=FILLED + 10 * 12, steps_ended=2 * 10 * 12)

    # Before: a pass over a table or one of its indexes with nearly every statement (10 000
    # index blocks and more). What the writes themselves touch is a few hundred blocks, even
    # counting the early rounds' should PostgreSQL report those late.
    assert after.rows_scanned - before.rows_scanned < FILLED, (before, after)
    assert after.index_blocks - before.index_blocks < 2 * after.index_size, (before, after)


async def test_while_its_tables_are_small_the_writer_plans_each_execution(
    store: SqlSagaStore, postgresql_url: str
) -> None:
    # Each statement more than five times: PostgreSQL could keep a generic plan by now.
    for batch in range(8):
        await asyncio.gather(*(run_saga(store, f"early-{batch}-{i}") for i in range(12)))

    assert await on_the_writers_session(store, "SHOW plan_cache_mode") == "force_custom_plan"
    assert await on_the_writers_session(store, GENERIC_PLANS_MADE) == 0


@pytest.fixture
def tables_sized_after_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer asks whether its tables have filled after every batch (from its first on:
    ask for this fixture before the store)."""
    monkeypatch.setattr(sql_plans, "CHECK_SECONDS", 0.0)


async def test_once_its_tables_fill_its_writes_and_point_reads_keep_plans_that_find_by_key(
    tables_sized_after_every_batch: None,
    store: SqlSagaStore,
    postgresql_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.store.sql")
    for batch in range(8):
        await asyncio.gather(*(run_saga(store, f"early-{batch}-{i}") for i in range(12)))
    await fill_with_finished_sagas(postgresql_url, FILLED)  # well past GENERIC_PLANS_FROM
    await asyncio.sleep(1.1)  # statistics reported (see the test above)
    await store.heartbeat("replica-a")
    before = await work_done(postgresql_url, recorded=FILLED + 8 * 12, steps_ended=2 * 8 * 12)
    for batch in range(8):
        await asyncio.gather(*(run_saga(store, f"late-{batch}-{i}") for i in range(12)))
        await asyncio.gather(*(store.position(FACADE, f"late-{batch}-{i}") for i in range(12)))

    assert await on_the_writers_session(store, "SHOW plan_cache_mode") == "auto"
    assert await on_the_writers_session(store, GENERIC_PLANS_MADE) > 0
    assert await on_a_point_reads_session(store, "SHOW plan_cache_mode") == "auto"
    assert "its tables have filled" in caplog.text
    await store.close()
    after = await work_done(postgresql_url, recorded=FILLED + 16 * 12, steps_ended=2 * 16 * 12)
    # The generic plans find sagas by their key and steps by their saga's number: no pass
    # over a table or a listing index (see the test above).
    assert after.rows_scanned - before.rows_scanned < FILLED, (before, after)
    assert after.index_blocks - before.index_blocks < 2 * after.index_size, (before, after)


GENERIC_PLANS_MADE = (
    "SELECT coalesce(sum(generic_plans), 0) FROM pg_prepared_statements"
    " WHERE cardinality(parameter_types) > 0"  # one without parameters has only the one plan
)


async def on_the_writers_session(store: SqlSagaStore, query: str) -> Any:
    """`query`'s value on the writer's own connection (between its batches)."""
    writer = store._running()
    assert isinstance(writer, PostgresWriter)
    held = writer._connection
    assert held is not None
    return await held.driver.fetchval(query)


async def on_a_point_reads_session(store: SqlSagaStore, query: str) -> Any:
    """`query`'s value on a connection of the point reads' pool."""
    writer = store._running()
    assert isinstance(writer, PostgresWriter)
    async with writer._read_pool.acquire() as conn:
        return await conn.fetchval(query)


FILLED = 30_000


@dataclass(frozen=True)
class Work:
    """What PostgreSQL counted of the sagas' and their steps' tables."""

    rows_scanned: int
    """Rows read by sequential scans."""
    index_blocks: int
    """Blocks read of the sagas' indexes other than those finding one by its number or key."""
    index_size: int
    """Blocks those indexes hold now."""


async def fill_with_finished_sagas(url: str, count: int) -> None:
    """`count` COMPLETED two-step sagas, written behind the store's back."""
    await execute(
        url,
        "INSERT INTO sagas (facade, request_id, kind, state, payload, payload_hash, data, owner,"
        " error_code, error_reason, created_at, updated_at)"
        f" SELECT '{FACADE}', 'filled-' || n, 'sync', 'COMPLETED', '{{}}', 'hash', '', 'x', '',"
        f" '', now(), now() FROM generate_series(1, {count}) AS n",
    )
    await execute(
        url,
        "INSERT INTO saga_steps (saga_id, idx, name, state, attempts, started_at,"
        " error, compensation, compensation_error)"
        " SELECT sagas.id, idx, 'step-' || idx, 'DONE', 1, now(), '', '', ''"
        " FROM sagas, generate_series(0, 1) AS idx WHERE sagas.request_id LIKE 'filled-%'",
    )


async def work_done(url: str, *, recorded: int, steps_ended: int) -> Work:
    """`Work` once PostgreSQL's statistics count `recorded` sagas inserted and `steps_ended`
    steps' rows updated."""
    query = (
        "SELECT (SELECT sum(seq_tup_read) FROM pg_stat_user_tables"
        "        WHERE relname IN ('sagas', 'saga_steps')),"
        " sum(idx_blks_hit + idx_blks_read), sum(pg_relation_size(indexrelid)) / 8192,"
        " (SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'sagas'),"
        " (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'saga_steps')"
        " FROM pg_statio_user_indexes WHERE relname = 'sagas'"
        " AND indexrelname NOT IN ('sagas_pkey', 'uq_sagas_key')"
    )
    async with asyncio.timeout(15):
        while True:
            [(scanned, blocks, size, inserted, updated)] = await execute(url, query)
            if inserted >= recorded and updated >= steps_ended:
                return Work(int(scanned), int(blocks), int(size))
            await asyncio.sleep(0.1)


def example_arguments(statement: Statement) -> list[Any]:
    """A value of its type for each of `statement`'s parameters (an array where it takes one)."""
    now = datetime.now(UTC)
    arguments: list[Any] = []
    for number, name in enumerate(statement.names, 1):
        value: Any = {"idx": 0, "limit": 1}.get(name, "x")
        if name in ("at", "deadline", "hold", "now", "stale"):
            value = now
        array = re.search(rf"CAST\(\${number} AS \w+\[\]\)", statement.sql) is not None
        arguments.append([value] if array else value)
    return arguments


async def test_a_write_cancelled_by_its_caller_spares_the_others(store: SqlSagaStore) -> None:
    tasks = [asyncio.create_task(run_saga(store, f"r{i}")) for i in range(10)]
    await asyncio.sleep(0)
    tasks[3].cancel()

    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert isinstance(results[3], asyncio.CancelledError)
    assert results[:3] + results[4:] == [None] * 9
    for i in (*range(3), *range(4, 10)):
        assert (await get(store, f"r{i}")).state == SagaState.COMPLETED
    await run_saga(store, "after")  # the writer goes on


async def test_a_closed_store_refuses_writes(store: SqlSagaStore) -> None:
    await store.close()

    with pytest.raises(RuntimeError, match="not running"):
        await begin(store, "r1")


# --- starting: migrations, reopening, URLs --------------------------------------------------------


async def test_replicas_starting_at_once_migrate_the_database_once(
    open_store: StoreOpener, store_url: str
) -> None:
    stores = await asyncio.gather(*(open_store() for _ in range(4)))

    assert await begin(stores[0], "r1")
    assert (await get(stores[3], "r1")).owner == "replica-a"
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert await execute(store_url, "SELECT version_num FROM alembic_version") == [(head,)]


async def _load_dump_from_before_migrations(url: str) -> None:
    if is_sqlite(url):
        conn = sqlite3.connect(make_url(url).database or "")
        try:
            conn.executescript((DATA / "store_before_migrations.sqlite.sql").read_text())
        finally:
            conn.close()
        return
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    pg = await asyncpg.connect(dsn, timeout=5)
    try:
        await pg.execute((DATA / "store_before_migrations.postgresql.sql").read_text())
    finally:
        await pg.close()


async def test_a_store_started_on_a_database_from_before_migrations_serves_its_sagas(
    open_store: StoreOpener, store_url: str
) -> None:
    # Sagas an earlier version recorded as "<facade>/<request id>" (see tests/data).
    await _load_dump_from_before_migrations(store_url)

    store = await open_store()

    sync, async_ = (
        await get(store, "shared-1", facade="SyncBooking"),
        await get(store, "shared-1", facade="AsyncBooking"),
    )
    assert (sync.kind, async_.kind) == ("sync", "async")
    assert sync.state == async_.state == SagaState.COMPLETED
    assert sync.data == '{"order_id": "o-1", "payment_id": "p-1"}'
    running = await get(store, "running-1", facade="SyncBooking")
    assert running.current_step is not None and running.current_step.attempts == 2
    assert await store.apply("SyncBooking", "running-1", StepEnded(1, "{}", complete=True))
    ended = CompensationEnded(SagaState.COMPENSATED, done=(0,))
    assert await store.apply("AsyncBooking", "compensating-1", ended)
    assert (await get(store, "compensating-1", facade="AsyncBooking")).state == (
        SagaState.COMPENSATED
    )


async def test_data_survives_close_and_reopen(store_url: str) -> None:
    async with SqlSagaStore(store_url) as store:
        await run_saga(store, "r1")
        await store.heartbeat("replica-a")

    async with SqlSagaStore(store_url) as reopened:
        saga = await get(reopened, "r1")
        assert (saga.state, saga.data) == (SagaState.COMPLETED, '{"r1": 1}')
        assert [(step.name, step.state) for step in saga.steps] == [
            ("step-0", StepState.DONE),
            ("step-1", StepState.DONE),
        ]
        assert await reopened.begin(new_saga("r1")) == saga
        # replica-a's heartbeat survived too: its sagas are not orphans.
        assert await begin(reopened, "r2", owner="replica-a")
        assert await reopened.claim_stalled("me", stale_after=60, hold_for=30) == []


def test_in_memory_sqlite_is_refused() -> None:
    for url in ("sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:", "sqlite:///:memory:"):
        with pytest.raises(ValueError, match="in-memory"):
            SqlSagaStore(url)
    with pytest.raises(ValueError, match="unsupported"):
        SqlSagaStore("mysql+aiomysql://user@host/db")


def test_store_from_url_picks_the_store(tmp_path: Path) -> None:
    assert isinstance(store_from_url("memory://"), InMemorySagaStore)
    assert isinstance(store_from_url(""), InMemorySagaStore)
    sqlite = store_from_url(f"sqlite:///{tmp_path / 'x.db'}")
    assert isinstance(sqlite, SqlSagaStore)
    assert sqlite.url.startswith("sqlite+aiosqlite:///")
    postgres = store_from_url("postgresql://postgres:secret@127.0.0.1:5432/db")
    assert isinstance(postgres, SqlSagaStore)
    assert postgres.url == "postgresql+asyncpg://postgres:***@127.0.0.1:5432/db"


# --- listing --------------------------------------------------------------------------------------


async def test_list_filters_by_facade_and_state_newest_first(store: SqlSagaStore) -> None:
    for request_id, facade in [("b1", "booking"), ("p1", "payment"), ("b2", "booking")]:
        assert await begin(store, request_id, facade=facade)
    assert await begin(store, "b3", facade="booking")
    assert await store.apply("booking", "b2", StepEnded(0, "{}", complete=True))

    assert ids(await store.list_sagas()) == ["b3", "b2", "p1", "b1"]
    assert ids(await store.list_sagas(facade="booking")) == ["b3", "b2", "b1"]
    assert ids(await store.list_sagas(state=SagaState.COMPLETED)) == ["b2"]
    assert ids(await store.list_sagas(facade="booking", state=SagaState.RUNNING)) == ["b3", "b1"]
    assert ids(await store.list_sagas(facade="payment", state=SagaState.COMPLETED)) == []


async def list_all(store: SagaStore, *, page_size: int, **filters: Any) -> list[list[str]]:
    """Every page, following the tokens."""
    pages, token = [], ""
    for _ in range(100):
        page = await store.list_sagas(page_size=page_size, page_token=token, **filters)
        pages.append(ids(page))
        if not (token := page.next_page_token):
            return pages
    raise AssertionError("the pages never ended")


async def test_list_pages_without_gaps_or_repeats(store: SqlSagaStore) -> None:
    # Begun concurrently: created_at may tie, and the keyset must still hold.
    await asyncio.gather(*(run_saga(store, f"r{i:02d}") for i in range(8)))
    await run_saga(store, "r00", facade="payment")

    pages = await list_all(store, page_size=3, facade="booking")

    listed = [request_id for page in pages for request_id in page]
    everything = (await store.list_sagas(facade="booking", page_size=100)).sagas
    assert [len(page) for page in pages] == [3, 3, 2]
    assert listed == [saga.request_id for saga in everything]
    assert sorted(listed) == [f"r{i:02d}" for i in range(8)]
    assert [(s.created_at, s.request_id) for s in everything] == sorted(
        ((s.created_at, s.request_id) for s in everything), reverse=True
    )
    assert all(len(saga.steps) == 2 for saga in everything)


async def test_list_pages_through_sagas_created_in_the_same_microsecond(
    store: SqlSagaStore, store_url: str
) -> None:
    for i in range(7):
        assert await begin(store, f"t{i}", facade="booking" if i % 2 else "another")
    stamp = "2030-01-01 00:00:00.000000" if is_sqlite(store_url) else "2030-01-01 00:00:00+00"
    await execute(store_url, f"UPDATE sagas SET created_at = '{stamp}'")

    pages = await list_all(store, page_size=3)

    # The facade, then the request id, break the tie: newest first, no gap, no repeat.
    listed = [request_id for page in pages for request_id in page]
    assert listed == ["t5", "t3", "t1", "t6", "t4", "t2", "t0"]
    every = (await store.list_sagas(page_size=100)).sagas
    assert {saga.created_at for saga in every} == {datetime(2030, 1, 1, tzinfo=UTC)}


async def test_list_clamps_the_page_size_and_refuses_a_bad_token(store: SqlSagaStore) -> None:
    for i in range(3):
        assert await begin(store, f"r{i}")

    smallest = await store.list_sagas(page_size=0)
    assert ids(smallest) == ["r2"]
    assert smallest.next_page_token
    assert len((await store.list_sagas(page_size=10_000)).sagas) == 3
    for token in ("not a token", "bm90IGpzb24", "WyJ4Il0"):  # not base64, not JSON, not ours
        with pytest.raises(ValueError, match="page token"):
            await store.list_sagas(page_token=token)


# --- the SQLite writer: bugs, locks, pacing, checkpoints ------------------------------------------


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"


@dataclass(eq=False, slots=True)
class UnknownWrite(Op):
    """A queued write of no kind the writer knows."""

    @property
    def key(self) -> tuple[str, str, str]:
        return ("u", "", "")


async def test_the_sqlite_writer_outlives_a_batch_it_cannot_apply(tmp_path: Path) -> None:
    # A write of a kind the writer does not know: a bug, as the writer sees it.
    odd = UnknownWrite(datetime.now(UTC), asyncio.get_running_loop().create_future())

    async with SqlSagaStore(sqlite_url(tmp_path)) as store:
        with pytest.raises(TypeError):
            await store._submit(odd)
        await run_saga(store, "after")

        assert (await get(store, "after")).state == SagaState.COMPLETED


def hold_write_lock(path: Path) -> sqlite3.Connection:
    """Another connection (another process, as the writer sees it) taking the write lock."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


async def test_a_sqlite_write_waits_out_another_connections_write_lock(tmp_path: Path) -> None:
    async with SqlSagaStore(sqlite_url(tmp_path)) as store:
        other = hold_write_lock(tmp_path / "sagas.db")
        write = asyncio.create_task(begin(store, "w1"))
        await asyncio.sleep(0.3)
        assert not write.done()  # neither failed nor blocking the loop: this test runs

        other.execute("COMMIT")
        other.close()

        assert await asyncio.wait_for(write, 2)
        assert (await get(store, "w1")).state == SagaState.RUNNING


async def test_a_sqlite_write_fails_when_the_lock_is_held_past_the_lock_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql_sqlite, "LOCK_TIMEOUT_SECONDS", 0.3)
    async with SqlSagaStore(sqlite_url(tmp_path)) as store:
        other = hold_write_lock(tmp_path / "sagas.db")
        with pytest.raises(OperationalError, match="locked"):
            await asyncio.wait_for(begin(store, "w1"), 5)
        other.execute("ROLLBACK")
        other.close()

        # The writer goes on once the lock is free.
        assert await asyncio.wait_for(begin(store, "w2"), 2)
        assert await store.get(FACADE, "w1") is None


async def test_a_lone_sqlite_write_commits_at_once_and_close_flushes_paced_ones(
    tmp_path: Path,
) -> None:
    store = SqlSagaStore(sqlite_url(tmp_path), commit_interval=60)
    await store.start()
    try:
        # The first write after a quiet spell is not paced...
        assert await asyncio.wait_for(begin(store, "p1"), 2)
        # ...the next, right behind it, waits for the interval...
        paced = asyncio.create_task(begin(store, "p2"))
        await asyncio.sleep(0.2)
        assert not paced.done()
    finally:
        # ...unless the store closes: then it is written at once.
        await asyncio.wait_for(store.close(), 5)
    assert await paced

    async with SqlSagaStore(sqlite_url(tmp_path)) as reopened:
        assert (await get(reopened, "p2")).state == SagaState.RUNNING


async def test_writes_queued_together_share_a_paced_sqlite_transaction(tmp_path: Path) -> None:
    async with SqlSagaStore(sqlite_url(tmp_path), commit_interval=0.05) as store:
        assert await begin(store, "first")  # starts the interval
        assert all(await asyncio.gather(*(begin(store, f"b{n}") for n in range(50))))

        assert store.stats.transactions <= 3


async def test_the_sqlite_wal_stays_bounded_under_continuous_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql_sqlite, "CHECKPOINT_SECONDS", 0.05)
    wal = tmp_path / "sagas.db-wal"
    largest = 0
    async with SqlSagaStore(sqlite_url(tmp_path), commit_interval=0.001) as store:

        async def sagas(worker: int) -> None:
            nonlocal largest
            for n in range(200):
                await run_saga(store, f"s{worker}-{n}")
                largest = max(largest, wal.stat().st_size)

        await asyncio.gather(*(sagas(worker) for worker in range(8)))
        written = store.stats.ops

    # 1600 sagas: without checkpoints the WAL holds every frame they wrote (tens of MB);
    # with them it is started over again and again.
    assert written == 1600 * 3
    assert largest < 8 * 1024 * 1024, f"WAL grew to {largest} bytes"
