"""SQLite's change feed: the stores on one database file, in this process and in others, hear
each other's committed saga writes at once; a lost announcement is a gap."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from orchestrator.store import StepRestarted
from orchestrator.store.sql import SqlSagaStore
from orchestrator.store.sql._host_feed import HostChangeFeed, feed_directory
from tests.support.processes import ROOT
from tests.support.store_backends import FACADE, new_saga

BOUND = 10.0
"""Seconds any single wait in these tests may take before it fails."""


@pytest.fixture
def database(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"


@pytest.fixture
async def stores(database: str) -> AsyncIterator[tuple[SqlSagaStore, SqlSagaStore]]:
    """Two stores on one SQLite file, as two processes would have."""
    a, b = SqlSagaStore(database), SqlSagaStore(database)
    await a.start()
    await b.start()
    yield a, b
    await a.close()
    await b.close()


def feed(store: SqlSagaStore) -> HostChangeFeed:
    assert isinstance(store.change_feed, HostChangeFeed)
    return store.change_feed


def exists(path: str) -> bool:
    return os.path.exists(path)


async def until(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(BOUND):
        while not condition():  # noqa: ASYNC110 (the feed calls back on the loop)
            await asyncio.sleep(0.005)


async def test_a_store_hears_another_stores_writes_and_its_own(
    stores: tuple[SqlSagaStore, SqlSagaStore],
) -> None:
    a, b = stores
    heard: list[tuple[str, str]] = []
    a.subscribe_changes(lambda f, r: heard.append((f, r)))

    await b.begin(new_saga("h1"))
    await until(lambda: (FACADE, "h1") in heard, "heard the other store's begin")
    await a.apply(FACADE, "h1", StepRestarted(0))

    assert a.announces_changes and b.announces_changes
    assert heard == [(FACADE, "h1"), (FACADE, "h1")]


async def test_a_listener_of_others_writes_hears_another_stores_and_not_its_stores_own(
    stores: tuple[SqlSagaStore, SqlSagaStore],
) -> None:
    a, b = stores
    others: list[tuple[str, str]] = []
    a.subscribe_changes(lambda f, r: others.append((f, r)), others_only=True)

    await a.begin(new_saga("h-mine"))
    await b.begin(new_saga("h-theirs"))
    await until(lambda: bool(others), "heard the other store's begin")
    await a.apply(FACADE, "h-theirs", StepRestarted(0))
    await b.apply(FACADE, "h-mine", StepRestarted(0))
    await until(lambda: len(others) == 2, "heard the other store's restart")

    assert others == [(FACADE, "h-theirs"), (FACADE, "h-mine")]


async def test_refused_writes_are_not_announced(
    stores: tuple[SqlSagaStore, SqlSagaStore],
) -> None:
    a, b = stores
    heard: list[tuple[str, str]] = []
    a.subscribe_changes(lambda f, r: heard.append((f, r)))
    await b.begin(new_saga("h2"))
    await until(lambda: bool(heard), "heard the begin")
    heard.clear()

    assert not await b.apply(FACADE, "h2", StepRestarted(5))
    assert await b.begin(new_saga("h2")) is not None  # already there: nothing written
    await b.begin(new_saga("h3"))
    await until(lambda: bool(heard), "heard a write")

    assert heard == [(FACADE, "h3")]


async def test_a_store_in_another_process_is_heard(database: str, tmp_path: Path) -> None:
    store = SqlSagaStore(database)
    await store.start()
    heard: list[tuple[str, str]] = []
    store.subscribe_changes(lambda f, r: heard.append((f, r)))
    script = textwrap.dedent(
        f"""
        import asyncio
        from tests.support.store_backends import new_saga
        from orchestrator.store.sql import SqlSagaStore

        async def main():
            store = SqlSagaStore({database!r})
            await store.start()
            await store.begin(new_saga("from-another-process"))
            await store.close()

        asyncio.run(main())
        """
    )
    try:
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=ROOT)
        async with asyncio.timeout(BOUND * 3):
            assert await process.wait() == 0
        await until(lambda: bool(heard), "heard the other process")

        assert heard == [(FACADE, "from-another-process")]
    finally:
        await store.close()


async def test_a_lost_announcement_is_told_as_a_gap(
    stores: tuple[SqlSagaStore, SqlSagaStore], tmp_path: Path
) -> None:
    a, _ = stores
    gaps: list[int] = []
    heard: list[tuple[str, str]] = []
    a.subscribe_changes(lambda f, r: heard.append((f, r)), lambda: gaps.append(1))
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.bind(str(tmp_path / "sender.sock"))
    try:
        sender.sendto(b'1\n[["booking","g1"]]', feed(a).address)
        sender.sendto(b'3\n[["booking","g3"]]', feed(a).address)  # 2 was lost
        await until(lambda: len(heard) == 2, "heard both")
    finally:
        sender.close()

    assert heard == [(FACADE, "g1"), (FACADE, "g3")]
    assert gaps == [1]
    assert feed(a).lost == 1


async def test_the_socket_of_a_process_gone_is_removed_by_the_next_writer(
    stores: tuple[SqlSagaStore, SqlSagaStore], database: str
) -> None:
    a, _ = stores
    directory = feed_directory(database.removeprefix("sqlite+aiosqlite:///"))
    stale = directory / "999999-gone.sock"
    orphan = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    orphan.bind(str(stale))
    orphan.close()  # its file stays: nobody is bound to it any more

    await a.begin(new_saga("h4"))

    assert not stale.exists()
    assert len(list(directory.glob("*.sock"))) == 2


async def test_closing_a_store_removes_its_socket(database: str) -> None:
    store = SqlSagaStore(database)
    await store.start()
    address = feed(store).address
    assert exists(address)

    await store.close()

    assert not exists(address)
    assert not store.announces_changes
