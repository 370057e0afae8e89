"""SqlSagaStore on SQLite and PostgreSQL: one behaviour per test, each on both backends.

The databases come from tests/support/databases.py: a SQLite file per test, and a
PostgreSQL database per module on `$ORCH_TEST_POSTGRES_URL`'s server (default
postgres@127.0.0.1:5432), skipped when unreachable unless `$CI` is set.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from sqlalchemy import text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import create_async_engine

from orchestrator.store import (
    InMemorySagaStore,
    SagaRecord,
    SagaState,
    SagaStore,
    SqlSagaStore,
    StepState,
    store_from_url,
)
from orchestrator.store.sql import _store as sql_store
from orchestrator.store.sql._store import _Op, replicas, sagas

if TYPE_CHECKING:
    from tests.support.databases import StoreOpener


pytestmark = pytest.mark.timeout(30)


async def begin(
    store: SagaStore,
    request_id: str,
    *,
    facade: str = "booking",
    kind: str = "sync",
    owner: str = "replica-a",
    payload: str = '{"hotel": "h1"}',
) -> bool:
    result = await store.begin(
        request_id=request_id,
        facade=facade,
        kind=kind,
        payload=payload,
        payload_hash=f"hash-{payload}",
        owner=owner,
    )
    return result.created


async def run_saga(store: SagaStore, request_id: str, *, steps: int = 2) -> None:
    """A synthetic saga: begin, each step started and finished, then COMPLETED."""
    await begin(store, request_id)
    for index in range(steps):
        await store.step_started(request_id, index, f"step-{index}")
        await store.step_finished(
            request_id, index, state=StepState.DONE, data=f'{{"{request_id}": {index}}}'
        )
    await store.set_state(request_id, SagaState.COMPLETED)


async def get(store: SagaStore, request_id: str) -> SagaRecord:
    record = await store.get(request_id)
    assert record is not None, request_id
    return record


async def test_begin_creates_once_then_returns_the_existing_record(store: SqlSagaStore) -> None:
    assert await begin(store, "r1", payload='{"n": 1}')
    await store.step_started("r1", 0, "reserve")

    again = await store.begin(
        request_id="r1",
        facade="other",
        kind="async",
        payload='{"n": 2}',
        payload_hash="other",
        owner="replica-b",
    )

    assert not again.created
    existing = again.existing
    assert existing is not None
    assert (existing.request_id, existing.facade, existing.kind, existing.owner) == (
        "r1",
        "booking",
        "sync",
        "replica-a",
    )
    assert (existing.payload, existing.state, existing.data) == ('{"n": 1}', SagaState.RUNNING, "")
    assert [step.name for step in existing.steps] == ["reserve"]
    assert existing.created_at.tzinfo == UTC
    assert existing.updated_at >= existing.created_at


async def test_concurrent_begins_from_two_stores_create_each_saga_once(
    open_store: StoreOpener,
) -> None:
    first, second = await open_store(), await open_store()
    ids = [f"race-{i}" for i in range(20)]

    results = await asyncio.gather(
        *(begin(store, request_id) for request_id in ids for store in (first, second))
    )

    per_id = [results[i : i + 2] for i in range(0, len(results), 2)]
    assert all(sorted(pair) == [False, True] for pair in per_id), per_id


async def test_step_log_counts_attempts_across_restarts_of_a_step(store: SqlSagaStore) -> None:
    await begin(store, "r1")
    await store.step_started("r1", 0, "pay")
    await store.step_finished("r1", 0, state=StepState.FAILED, data="{}", error="timeout")
    await store.step_started("r1", 0, "pay")

    (step,) = (await get(store, "r1")).steps

    assert (step.index, step.name, step.state, step.attempts) == (0, "pay", StepState.RUNNING, 2)
    assert (step.finished_at, step.error) == (None, "")


async def test_step_finished_stores_the_step_state_and_the_saga_data(store: SqlSagaStore) -> None:
    await begin(store, "r1")
    await store.step_started("r1", 0, "reserve")
    before = await get(store, "r1")

    await store.step_finished("r1", 0, state=StepState.DONE, data='{"order": 7}')

    saga = await get(store, "r1")
    (step,) = saga.steps
    assert (step.state, step.error, saga.data) == (StepState.DONE, "", '{"order": 7}')
    assert step.finished_at is not None and step.finished_at >= step.started_at
    assert saga.updated_at > before.updated_at
    assert saga.completed_steps == ["reserve"]


async def test_set_state_moves_the_state_and_records_the_error(store: SqlSagaStore) -> None:
    await begin(store, "r1")
    await store.step_started("r1", 0, "reserve")
    await store.step_finished("r1", 0, state=StepState.DONE, data='{"order": 7}')

    await store.set_state(
        "r1", SagaState.COMPENSATING, error_code="PAYMENT_DECLINED", error_reason="card refused"
    )
    compensating = await get(store, "r1")
    # No data given keeps the data; no error given keeps the error that caused compensation.
    await store.set_state("r1", SagaState.COMPENSATED, data='{"order": null}')
    compensated = await get(store, "r1")

    assert (compensating.state, compensating.data) == (SagaState.COMPENSATING, '{"order": 7}')
    assert (compensated.state, compensated.data) == (SagaState.COMPENSATED, '{"order": null}')
    for saga in (compensating, compensated):
        assert (saga.error_code, saga.error_reason) == ("PAYMENT_DECLINED", "card refused")
    assert compensated.finished


async def test_get_returns_the_steps_in_index_order(store: SqlSagaStore) -> None:
    await begin(store, "r1")
    for index in (2, 0, 1):
        await store.step_started("r1", index, f"step-{index}")

    saga = await get(store, "r1")

    assert [(step.index, step.name) for step in saga.steps] == [
        (0, "step-0"),
        (1, "step-1"),
        (2, "step-2"),
    ]
    assert await store.get("missing") is None


async def test_writes_to_an_unknown_saga_raise_key_error(store: SqlSagaStore) -> None:
    with pytest.raises(KeyError):
        await store.step_started("missing", 0, "reserve")
    with pytest.raises(KeyError):
        await store.step_finished("missing", 0, state=StepState.DONE, data="{}")
    with pytest.raises(KeyError):
        await store.set_state("missing", SagaState.COMPLETED)
    assert await store.get("missing") is None


async def test_list_filters_by_facade_and_state_newest_first(store: SqlSagaStore) -> None:
    for request_id, facade in [("b1", "booking"), ("p1", "payment"), ("b2", "booking")]:
        await begin(store, request_id, facade=facade)
    await begin(store, "b3", facade="booking")
    await store.set_state("b2", SagaState.COMPLETED)

    def ids(page: Any) -> list[str]:
        return [saga.request_id for saga in page.sagas]

    assert ids(await store.list_sagas()) == ["b3", "b2", "p1", "b1"]
    assert ids(await store.list_sagas(facade="booking")) == ["b3", "b2", "b1"]
    assert ids(await store.list_sagas(state=SagaState.COMPLETED)) == ["b2"]
    assert ids(await store.list_sagas(facade="booking", state=SagaState.RUNNING)) == ["b3", "b1"]
    assert ids(await store.list_sagas(facade="payment", state=SagaState.COMPLETED)) == []


async def test_list_pages_without_gaps_or_repeats(store: SqlSagaStore) -> None:
    # Begun concurrently: created_at may tie, and the keyset must still hold.
    await asyncio.gather(*(run_saga(store, f"r{i:02d}") for i in range(8)))
    await begin(store, "other", facade="payment")

    pages, token = [], ""
    for _ in range(4):
        page = await store.list_sagas(facade="booking", page_size=3, page_token=token)
        pages.append([saga.request_id for saga in page.sagas])
        token = page.next_page_token
        if not token:
            break

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
        await begin(store, f"t{i}")
    engine = create_async_engine(store_url)
    async with engine.begin() as conn:
        await conn.execute(update(sagas).values(created_at=datetime(2030, 1, 1, tzinfo=UTC)))
    await engine.dispose()

    listed, stamps, token = [], set(), ""
    for _ in range(4):
        page = await store.list_sagas(page_size=3, page_token=token)
        listed += [saga.request_id for saga in page.sagas]
        stamps |= {saga.created_at for saga in page.sagas}
        if not (token := page.next_page_token):
            break

    # The request id breaks the tie: still newest first, no gap, no repeat.
    assert stamps == {datetime(2030, 1, 1, tzinfo=UTC)}
    assert listed == [f"t{i}" for i in reversed(range(7))]


async def test_list_clamps_the_page_size_and_refuses_a_bad_token(store: SqlSagaStore) -> None:
    for i in range(3):
        await begin(store, f"r{i}")

    smallest = await store.list_sagas(page_size=0)
    assert [saga.request_id for saga in smallest.sagas] == ["r2"]
    assert smallest.next_page_token
    assert len((await store.list_sagas(page_size=10_000)).sagas) == 3
    with pytest.raises(ValueError, match="page token"):
        await store.list_sagas(page_token="not a token")


async def test_claim_orphans_takes_sagas_of_stale_replicas_not_fresh_ones(
    store: SqlSagaStore, store_url: str
) -> None:
    await store.heartbeat("stale")
    await store.heartbeat("fresh")
    # Ten minutes without a heartbeat, without waiting ten minutes.
    engine = create_async_engine(store_url)
    async with engine.begin() as conn:
        await conn.execute(
            update(replicas)
            .where(replicas.c.owner == "stale")
            .values(heartbeat_at=datetime.now(UTC) - timedelta(minutes=10))
        )
    await engine.dispose()
    await begin(store, "of-stale", owner="stale")
    await begin(store, "of-fresh", owner="fresh")

    claimed = await store.claim_orphans("me", stale_after=60, kind="sync")

    assert [saga.request_id for saga in claimed] == ["of-stale"]
    assert claimed[0].owner == "me"
    assert (await get(store, "of-stale")).owner == "me"
    assert (await get(store, "of-fresh")).owner == "fresh"


async def test_claim_orphans_takes_sagas_of_owners_that_never_beat(store: SqlSagaStore) -> None:
    await begin(store, "r1", owner="ghost")
    await store.step_started("r1", 0, "reserve")

    claimed = await store.claim_orphans("me", stale_after=60, kind="sync")

    assert [(saga.request_id, saga.owner) for saga in claimed] == [("r1", "me")]
    assert [step.name for step in claimed[0].steps] == ["reserve"]
    assert await store.claim_orphans("me", stale_after=60, kind="sync") == []


async def test_claim_orphans_leaves_finished_other_kind_and_own_sagas(
    store: SqlSagaStore,
) -> None:
    await begin(store, "done", owner="ghost")
    await store.set_state("done", SagaState.COMPLETED)
    await begin(store, "compensated", owner="ghost")
    await store.set_state("compensated", SagaState.COMPENSATED)
    await begin(store, "async-one", owner="ghost", kind="async")
    await begin(store, "mine", owner="me")

    assert await store.claim_orphans("me", stale_after=0, kind="sync") == []
    assert (await get(store, "done")).owner == "ghost"


async def test_two_replicas_claiming_at_once_split_the_orphans(open_store: StoreOpener) -> None:
    first, second = await open_store(), await open_store()
    orphans = {f"orphan-{i:03d}" for i in range(150)}  # more than one claim's batch
    for request_id in sorted(orphans):
        await begin(first, request_id, owner="dead")
    await first.heartbeat("a")
    await second.heartbeat("b")

    async def claim_all(store: SqlSagaStore, me: str) -> list[str]:
        taken: list[str] = []
        while batch := await store.claim_orphans(me, stale_after=60, kind="sync"):
            assert all(saga.owner == me for saga in batch)
            taken += [saga.request_id for saga in batch]
        return taken

    by_a, by_b = await asyncio.gather(claim_all(first, "a"), claim_all(second, "b"))

    assert not set(by_a) & set(by_b)
    assert sorted(by_a + by_b) == sorted(orphans)
    owners = {(await get(first, request_id)).owner for request_id in orphans}
    assert owners <= {"a", "b"}


async def test_data_survives_close_and_reopen(store_url: str) -> None:
    store = SqlSagaStore(store_url)
    await store.start()
    await run_saga(store, "r1")
    await store.heartbeat("replica-a")
    await store.close()

    reopened = SqlSagaStore(store_url)
    await reopened.start()
    try:
        saga = await get(reopened, "r1")
        assert (saga.state, saga.data) == (SagaState.COMPLETED, '{"r1": 1}')
        assert [(step.name, step.state) for step in saga.steps] == [
            ("step-0", StepState.DONE),
            ("step-1", StepState.DONE),
        ]
        assert not await begin(reopened, "r1")
        # replica-a's heartbeat survived too: its sagas are not orphans.
        await begin(reopened, "r2", owner="replica-a")
        assert await reopened.claim_orphans("me", stale_after=60, kind="sync") == []
    finally:
        await reopened.close()


async def test_group_commit_makes_200_concurrent_sagas_durable(
    open_store: StoreOpener, store_url: str
) -> None:
    store = await open_store()
    ids = [f"saga-{i:03d}" for i in range(200)]

    await asyncio.gather(*(run_saga(store, request_id) for request_id in ids))
    await store.close()

    # Six writes a saga, far fewer transactions.
    assert store.stats.ops == 6 * len(ids)
    assert store.stats.transactions < len(ids)
    assert store.stats.largest_batch > 1
    reopened = await open_store()
    page = await reopened.list_sagas(page_size=500)
    assert sorted(saga.request_id for saga in page.sagas) == ids
    for saga in page.sagas:
        assert (saga.state, saga.data) == (SagaState.COMPLETED, f'{{"{saga.request_id}": 1}}')
        assert [(step.index, step.state, step.attempts) for step in saga.steps] == [
            (0, StepState.DONE, 1),
            (1, StepState.DONE, 1),
        ]


async def test_a_bad_write_fails_alone_and_spares_its_batch(store: SqlSagaStore) -> None:
    good = [f"good-{i:02d}" for i in range(30)]
    bad = store.begin(
        request_id="bad",
        facade="booking",
        kind="sync",
        payload=cast(str, None),  # NOT NULL: fails in the database, mid-batch
        payload_hash="h",
        owner="replica-a",
    )

    results = await asyncio.gather(
        *(begin(store, request_id) for request_id in good[:15]),
        bad,
        *(begin(store, request_id) for request_id in good[15:]),
        return_exceptions=True,
    )

    assert isinstance(results[15], IntegrityError)
    assert results[:15] + results[16:] == [True] * 30
    assert store.stats.failed_batches >= 1
    assert await store.get("bad") is None
    assert len((await store.list_sagas(page_size=100)).sagas) == 30


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


async def test_replicas_starting_at_once_create_the_schema_once(open_store: StoreOpener) -> None:
    stores = await asyncio.gather(*(open_store() for _ in range(4)))

    assert await begin(stores[0], "r1")
    assert await stores[3].get("r1") is not None


async def test_a_closed_store_refuses_writes(store: SqlSagaStore) -> None:
    await store.close()

    with pytest.raises(RuntimeError, match="not running"):
        await begin(store, "r1")


def test_in_memory_sqlite_is_refused() -> None:
    for url in ("sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:", "sqlite:///:memory:"):
        with pytest.raises(ValueError, match="in-memory"):
            SqlSagaStore(url)
    with pytest.raises(ValueError, match="unsupported"):
        SqlSagaStore("mysql+aiomysql://user@host/db")


def test_store_from_url_picks_the_store(tmp_path: Any) -> None:
    assert isinstance(store_from_url("memory://"), InMemorySagaStore)
    sqlite = store_from_url(f"sqlite:///{tmp_path / 'x.db'}")
    assert isinstance(sqlite, SqlSagaStore)
    assert sqlite.url.startswith("sqlite+aiosqlite:///")
    postgres = store_from_url("postgresql://postgres:secret@127.0.0.1:5432/db")
    assert isinstance(postgres, SqlSagaStore)
    assert postgres.url == "postgresql+asyncpg://postgres:***@127.0.0.1:5432/db"


async def test_a_store_created_by_an_earlier_version_gets_the_columns_it_lacks(
    store_url: str, open_store: StoreOpener
) -> None:
    # As an earlier version left it: the step log without the data its steps end with.
    first = await open_store()
    await first.close()
    engine = create_async_engine(store_url)
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE saga_steps DROP COLUMN data"))
        await conn.execute(text("ALTER TABLE sagas DROP COLUMN data_at"))
    await engine.dispose()

    store = await open_store()
    await begin(store, "old-1")
    await store.step_started("old-1", 0, "step-0")
    await store.step_finished("old-1", 0, state=StepState.DONE, data='{"after": 0}')

    assert (await get(store, "old-1")).data == '{"after": 0}'


async def test_the_saga_data_is_its_last_finished_steps_until_a_final_write(
    store: SqlSagaStore,
) -> None:
    await begin(store, "d1")
    await store.step_started("d1", 0, "step-0")
    await store.step_finished("d1", 0, state=StepState.DONE, data='{"n": 0}', next_step="step-1")
    after_first = await get(store, "d1")
    await store.step_finished(
        "d1", 1, state=StepState.DONE, data='{"n": 1}', saga_state=SagaState.COMPLETED
    )
    await store.set_state("d1", SagaState.COMPLETED)  # data None keeps it

    assert after_first.data == '{"n": 0}'
    final = await get(store, "d1")
    assert (final.data, final.state) == ('{"n": 1}', SagaState.COMPLETED)
    assert final.updated_at >= max(s.finished_at for s in final.steps if s.finished_at)


async def test_a_steps_end_moves_the_sagas_updated_at(store: SqlSagaStore) -> None:
    await begin(store, "u1")
    await store.step_started("u1", 0, "step-0")
    before = (await get(store, "u1")).updated_at
    await asyncio.sleep(0.002)
    await store.step_finished("u1", 0, state=StepState.DONE, data="{}")

    assert (await get(store, "u1")).updated_at > before


async def test_a_plain_step_end_of_a_step_never_started_is_a_key_error(
    store: SqlSagaStore,
) -> None:
    await begin(store, "k1")

    with pytest.raises(KeyError):
        await store.step_finished("k1", 3, state=StepState.DONE, data="{}")


@dataclass(eq=False, slots=True)
class UnknownWrite(_Op):
    """A queued write of no kind the writer knows."""

    @property
    def key(self) -> str:
        return "unknown"


async def test_the_sqlite_writer_outlives_a_batch_it_cannot_apply(tmp_path: Path) -> None:
    # A write of a kind the writer does not know: a bug, as the writer sees it.
    odd = UnknownWrite(datetime.now(UTC), asyncio.get_running_loop().create_future())

    async with SqlSagaStore(f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}") as store:
        with pytest.raises(TypeError):
            await store._submit(odd)
        await run_saga(store, "after")

        assert (await get(store, "after")).state == SagaState.COMPLETED


# --- the SQLite writer: locks, pacing, checkpoints ------------------------------------------------


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"


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
    monkeypatch.setattr(sql_store, "LOCK_TIMEOUT_SECONDS", 0.3)
    async with SqlSagaStore(sqlite_url(tmp_path)) as store:
        other = hold_write_lock(tmp_path / "sagas.db")
        with pytest.raises(OperationalError, match="locked"):
            await asyncio.wait_for(begin(store, "w1"), 5)
        other.execute("ROLLBACK")
        other.close()

        # The writer goes on once the lock is free.
        assert await asyncio.wait_for(begin(store, "w2"), 2)
        assert await store.get("w1") is None


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
        await begin(store, "first")  # starts the interval
        await asyncio.gather(*(begin(store, f"b{n}") for n in range(50)))

        assert store.stats.transactions <= 3


async def test_the_sqlite_wal_stays_bounded_under_continuous_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql_store, "CHECKPOINT_SECONDS", 0.05)
    wal = tmp_path / "sagas.db-wal"
    async with SqlSagaStore(sqlite_url(tmp_path), commit_interval=0.001) as store:

        async def sagas(worker: int) -> None:
            for n in range(150):
                await run_saga(store, f"s{worker}-{n}")

        await asyncio.gather(*(sagas(worker) for worker in range(8)))
        written = store.stats.ops
        largest = wal.stat().st_size

    # 1200 sagas, about 2 MB of WAL frames each 100 writes: without checkpoints the
    # file holds them all (tens of MB); with them it is started over again and again.
    assert written == 1200 * 6
    assert largest < 8 * 1024 * 1024, f"WAL grew to {largest} bytes"
