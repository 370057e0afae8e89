"""PostgreSQL's change feed: replicas hear of each other's saga writes through LISTEN / NOTIFY.

Two `SqlSagaStore`s on one real PostgreSQL database play two replicas: A
serves `WatchSaga`, B writes. Watchers on A are given poll intervals far
longer than any bound asserted here, so a change they see in time can only
have come from the notification. The listening connection is killed with
`pg_terminate_backend` to show it comes back by itself. The payloads' format
and limit are checked on their own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from orchestrator.proto import saga_pb2, saga_pb2_grpc
from orchestrator.status import SagaStatusService, saga_grpc_service
from orchestrator.store import InMemorySagaStore, NewSaga, StepEnded, StepFailed, StepRestarted
from orchestrator.store.records import SagaState
from orchestrator.store.sql import SqlSagaStore
from orchestrator.store.sql._listen import (
    CHANNEL,
    MAX_PAYLOAD_BYTES,
    PgChangeFeed,
    notification_payloads,
    parse_payload,
)

FACADE = "booking"
NEVER = 60.0
"""A poll interval no test here waits out: what arrives sooner was announced."""
PROMPTLY = 1.0
"""How soon an announced change must reach a watcher on the other replica."""
BOUND = 10.0
"""Seconds any single wait in these tests may take before it fails."""


def new_id() -> str:
    return f"feed-{uuid.uuid4().hex[:12]}"


def new_saga(request_id: str) -> NewSaga:
    return NewSaga(
        facade=FACADE,
        request_id=request_id,
        kind="async",
        payload="{}",
        payload_hash="h",
        owner="replica-b",
        first_step="create_order",
        deadline_at=datetime.now(UTC) + timedelta(minutes=5),
    )


ORDER_DONE = StepEnded(0, '{"order": 1}', next_step="create_payment")


def feed_of(store: SqlSagaStore) -> PgChangeFeed:
    assert store.change_feed is not None
    return store.change_feed


@dataclass
class Replicas:
    """Replica A (serving WatchSaga, its stub) and replica B (writing), one database."""

    a: SqlSagaStore
    b: SqlSagaStore
    status: SagaStatusService
    stub: saga_pb2_grpc.SagaServiceAsyncStub


@pytest.fixture
async def replicas(postgres_url: str) -> AsyncIterator[Replicas]:
    a, b = SqlSagaStore(postgres_url), SqlSagaStore(postgres_url)
    await a.start()
    await b.start()
    service, status = saga_grpc_service(
        a, poll_interval=NEVER, safety_poll_interval=NEVER, facades=[FACADE]
    )
    server = grpc.aio.server()
    service.add_to_server(service.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with asyncio.timeout(BOUND):
            await feed_of(a).wait_live()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Replicas(a, b, status, saga_pb2_grpc.SagaServiceStub(channel))
    finally:
        await server.stop(None)
        status.close()
        await a.close()
        await b.close()


async def next_message(call: object, within: float = BOUND) -> saga_pb2.Saga:
    """The stream's next message, within `within` seconds."""
    async with asyncio.timeout(within):
        message = await call.read()  # type: ignore[attr-defined]
    assert isinstance(message, saga_pb2.Saga), "the stream ended"
    return message


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) until `condition()` is true."""
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {BOUND}s"
        await asyncio.sleep(0.01)


async def watching(replicas: Replicas, request_id: str) -> object:
    """A WatchSaga call on replica A, its first message read."""
    call = replicas.stub.WatchSaga(saga_pb2.WatchSagaRequest(request_id=request_id, facade=FACADE))
    first = await next_message(call)
    assert first.state == saga_pb2.RUNNING
    await until(lambda: replicas.status.active_watches == 1, "watching")
    return call


async def terminate_listeners(database_url: str, pids: set[int]) -> None:
    """pg_terminate_backend the listening connections `pids`."""
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        for pid in pids:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()


async def test_a_write_on_one_replica_wakes_a_watcher_on_another_at_once(
    replicas: Replicas,
) -> None:
    request_id = new_id()
    assert await replicas.b.begin(new_saga(request_id)) is None
    call = await watching(replicas, request_id)

    started = time.monotonic()
    assert await replicas.b.apply(FACADE, request_id, ORDER_DONE)
    saga = await next_message(call, within=PROMPTLY)
    elapsed = time.monotonic() - started

    assert [step.name for step in saga.steps] == ["create_order", "create_payment"]
    assert elapsed < PROMPTLY, f"the change took {elapsed:.2f}s"
    assert replicas.a.announces_changes
    call.cancel()  # type: ignore[attr-defined]


async def test_a_watcher_on_another_replica_follows_a_saga_to_its_end(
    replicas: Replicas,
) -> None:
    request_id = new_id()
    assert await replicas.b.begin(new_saga(request_id)) is None
    call = await watching(replicas, request_id)

    assert await replicas.b.apply(FACADE, request_id, ORDER_DONE)
    await next_message(call, within=PROMPTLY)
    declined = StepFailed(1, "FAILED_PRECONDITION", "declined", then=SagaState.COMPENSATED)
    assert await replicas.b.apply(FACADE, request_id, declined)
    last = await next_message(call, within=PROMPTLY)

    assert last.state == saga_pb2.COMPENSATED
    async with asyncio.timeout(BOUND):
        assert not isinstance(await call.read(), saga_pb2.Saga)  # type: ignore[attr-defined]


async def test_a_watcher_survives_the_listening_connection_being_killed(
    replicas: Replicas, postgres_url: str
) -> None:
    request_id = new_id()
    assert await replicas.b.begin(new_saga(request_id)) is None
    call = await watching(replicas, request_id)
    feed = feed_of(replicas.a)
    killed = feed.backend_pid
    assert killed is not None

    await terminate_listeners(postgres_url, {killed})
    await until(lambda: feed.connections == 2 and feed.live, "listening again")
    assert feed.backend_pid not in (None, killed)

    started = time.monotonic()
    assert await replicas.b.apply(FACADE, request_id, ORDER_DONE)
    # The watcher may first be sent nothing new: the reconnection woke it to re-read.
    saga = await next_message(call, within=PROMPTLY)
    elapsed = time.monotonic() - started

    assert [step.name for step in saga.steps] == ["create_order", "create_payment"]
    assert elapsed < PROMPTLY, f"the change took {elapsed:.2f}s after the reconnection"
    call.cancel()  # type: ignore[attr-defined]


async def test_a_lost_feed_tells_of_the_gap_when_it_drops_and_when_it_is_back(
    replicas: Replicas, postgres_url: str
) -> None:
    gaps: list[int] = []
    unsubscribe = replicas.a.subscribe_changes(lambda f, r: None, lambda: gaps.append(1))
    feed = feed_of(replicas.a)
    pid = feed.backend_pid
    assert pid is not None

    await terminate_listeners(postgres_url, {pid})
    await until(lambda: feed.connections == 2 and feed.live, "listening again")
    unsubscribe()

    assert len(gaps) == 2  # once when it dropped, once when it came back


async def test_a_refused_write_announces_nothing(replicas: Replicas) -> None:
    heard: list[tuple[str, str]] = []
    unsubscribe = replicas.a.subscribe_changes(lambda f, r: heard.append((f, r)))
    refused_id, changed_id = new_id(), new_id()
    assert await replicas.b.begin(new_saga(changed_id)) is None

    assert not await replicas.b.apply(FACADE, refused_id, ORDER_DONE)  # no such saga
    assert await replicas.b.apply(FACADE, changed_id, ORDER_DONE)
    # Notifications arrive in commit order: once the second is heard, the first would be.
    await until(lambda: heard.count((FACADE, changed_id)) == 2, "heard the begin and the change")
    unsubscribe()

    assert (FACADE, refused_id) not in heard


async def test_a_listener_of_others_writes_hears_another_replicas_and_not_its_stores_own(
    replicas: Replicas,
) -> None:
    others: list[tuple[str, str]] = []
    every: list[tuple[str, str]] = []
    stop_others = replicas.a.subscribe_changes(lambda f, r: others.append((f, r)), others_only=True)
    stop_every = replicas.a.subscribe_changes(lambda f, r: every.append((f, r)))
    mine, theirs = new_id(), new_id()

    assert await replicas.a.begin(new_saga(mine)) is None
    assert await replicas.b.begin(new_saga(theirs)) is None
    # Notifications arrive in commit order: once B's is heard, A's own was too.
    await until(lambda: (FACADE, theirs) in every, "heard B's begin")
    stop_others()
    stop_every()

    assert (FACADE, mine) in every
    assert others == [(FACADE, theirs)]


async def test_a_stores_own_writes_are_told_apart_again_once_its_writer_reconnects(
    replicas: Replicas, postgres_url: str
) -> None:
    others: list[tuple[str, str]] = []
    every: list[tuple[str, str]] = []
    stop_others = replicas.a.subscribe_changes(lambda f, r: others.append((f, r)), others_only=True)
    stop_every = replicas.a.subscribe_changes(lambda f, r: every.append((f, r)))
    assert await replicas.a.begin(new_saga(new_id())) is None
    # PostgreSQL ends A's writing connection (not its feed's): the writer takes a new one.
    writer_pid = feed_of(replicas.a).writer_pid
    assert writer_pid is not None
    await terminate_listeners(postgres_url, {writer_pid})
    mine = new_id()
    for _ in range(5):  # the first write after it may fail on the ended connection
        try:
            await replicas.a.begin(new_saga(mine))
            break
        except DBAPIError:
            await asyncio.sleep(0.1)
    else:
        pytest.fail("A's writer did not reconnect")
    theirs = new_id()
    assert await replicas.b.begin(new_saga(theirs)) is None
    await until(lambda: (FACADE, theirs) in every, "heard B's begin")
    stop_others()
    stop_every()

    assert feed_of(replicas.a).writer_pid not in (None, writer_pid)
    assert (FACADE, mine) in every
    assert others == [(FACADE, theirs)]


async def test_a_batch_announces_every_saga_it_changed(replicas: Replicas) -> None:
    heard: set[tuple[str, str]] = set()
    unsubscribe = replicas.a.subscribe_changes(lambda f, r: heard.add((f, r)))
    # Long ids: a batch's keys take several payloads.
    ids = [f"{new_id()}-{'x' * 100}" for _ in range(300)]

    created = await asyncio.gather(*(replicas.b.begin(new_saga(i)) for i in ids))
    await until(lambda: {(FACADE, i) for i in ids} <= heard, "heard every saga")
    unsubscribe()

    assert created == [None] * len(ids)
    assert replicas.b.stats.largest_batch > 1


async def test_a_batchs_payloads_stay_under_postgresqls_limit_with_the_longest_keys(
    replicas: Replicas, postgres_url: str
) -> None:
    # Request ids of 128 characters at their longest as JSON: four UTF-8 bytes each, or a
    # control character escaped in six. The happy path's batch builds its payloads in SQL.
    ids = [f"{n:04d}" + ("\U0001f600" if n % 2 else "\x01") * 124 for n in range(120)]
    payloads: list[str] = []
    dsn = make_url(postgres_url).set(drivername="postgresql").render_as_string(False)
    listener = await asyncpg.connect(dsn, timeout=5)
    try:
        await listener.add_listener(CHANNEL, lambda *args: payloads.append(args[3]))
        created = await asyncio.gather(*(replicas.b.begin(new_saga(i)) for i in ids))
        heard = lambda: {key for p in payloads for key in parse_payload(p)}  # noqa: E731
        await until(lambda: {(FACADE, i) for i in ids} <= heard(), "heard every saga")
    finally:
        await listener.close()

    assert created == [None] * len(ids)
    assert replicas.b.stats.largest_batch > 1
    assert len(payloads) > 1
    assert all(len(payload.encode()) <= MAX_PAYLOAD_BYTES for payload in payloads)


async def test_a_store_without_announcements_leaves_watchers_polling(postgres_url: str) -> None:
    store = SqlSagaStore(postgres_url, announce_changes=False)
    await store.start()
    try:
        assert store.change_feed is None
        assert not store.announces_changes
    finally:
        await store.close()


async def test_a_sqlite_store_without_announcements_leaves_watchers_polling(
    tmp_path: Path,
) -> None:
    sqlite = SqlSagaStore(f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}", announce_changes=False)
    await sqlite.start()
    try:
        assert sqlite.change_feed is None
        assert not sqlite.announces_changes
    finally:
        await sqlite.close()


async def test_the_memory_store_announces_every_write_to_a_saga_at_once() -> None:
    store = InMemorySagaStore()
    heard: list[tuple[str, str]] = []
    unsubscribe = store.subscribe_changes(lambda f, r: heard.append((f, r)))

    await store.begin(new_saga("m1"))
    assert await store.apply(FACADE, "m1", StepRestarted(0))
    assert not await store.apply(FACADE, "m1", StepRestarted(3))  # refused: not announced
    unsubscribe()
    await store.begin(new_saga("m2"))

    assert store.announces_changes
    assert heard == [(FACADE, "m1"), (FACADE, "m1")]


# --- payloads ------------------------------------------------------------------------------


def test_payloads_stay_under_postgresqls_limit_and_name_every_saga() -> None:
    # 128 characters of four UTF-8 bytes each: the longest request id there is, in bytes.
    keys = [(f"facade-{n % 3}", f"{n:04d}" + "\U0001f600" * 124) for n in range(200)]

    payloads = notification_payloads(keys)

    assert len(payloads) > 1
    assert all(len(payload.encode()) <= MAX_PAYLOAD_BYTES for payload in payloads)
    assert [key for payload in payloads for key in parse_payload(payload)] == keys


def test_a_small_batch_is_one_payload() -> None:
    keys = [(FACADE, "a"), (FACADE, 'quote " and, comma')]

    [payload] = notification_payloads(keys)

    assert parse_payload(payload) == keys


@pytest.mark.parametrize("payload", ["{}", '[["only-one"]]', "[[1, 2]]", "not json"])
def test_a_payload_not_of_the_store_is_refused(payload: str) -> None:
    with pytest.raises(ValueError):
        parse_payload(payload)


async def test_a_foreign_notification_on_the_channel_is_taken_as_a_gap(
    replicas: Replicas, postgres_url: str
) -> None:
    gaps: list[int] = []
    unsubscribe = replicas.a.subscribe_changes(lambda f, r: None, lambda: gaps.append(1))
    dsn = make_url(postgres_url).set(drivername="postgresql").render_as_string(False)
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute("SELECT pg_notify('orchestrator_saga_changes', 'hello')")
    finally:
        await conn.close()
    await until(lambda: len(gaps) == 1, "told of a gap")
    unsubscribe()
