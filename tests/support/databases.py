"""pytest plugin: databases for the saga store tests, a SQLite file or a private PostgreSQL one.

`store_url` is parametrized over both backends. PostgreSQL is the server at
`$ORCH_TEST_POSTGRES_URL` (default `postgresql://postgres@127.0.0.1:5432/postgres`,
the database it names only serves to create ours): each test module gets a fresh
database there, dropped at the end, and each test starts without the store's
tables. Without a reachable server the PostgreSQL cases skip, except under `$CI`,
where they fail.

`open_store()` starts a `SqlSagaStore` on `store_url` (call it twice for two
replicas) and closes it after the test; `store` is the first one.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy.engine import URL, make_url

from orchestrator.store.sql import SqlSagaStore

__all__ = ["POSTGRES_URL_ENV", "StoreOpener", "admin_url", "create_database", "drop_database"]

POSTGRES_URL_ENV = "ORCH_TEST_POSTGRES_URL"
_DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
_TABLES = ("saga_steps", "sagas", "replicas", "saga_actions", "dead_letters", "alembic_version")
_T = TypeVar("_T")


class StoreOpener(Protocol):
    """`open_store`: a started store on the test's database."""

    def __call__(self, *, max_batch: int = ...) -> Awaitable[SqlSagaStore]: ...


def admin_url() -> URL:
    """The PostgreSQL server's maintenance database, as a plain `postgresql://` URL."""
    url = make_url(os.environ.get(POSTGRES_URL_ENV) or _DEFAULT_ADMIN_URL)
    return url.set(drivername="postgresql")


def _dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def create_database(admin: URL) -> URL:
    """A new, empty database on `admin`'s server; its `postgresql+asyncpg://` URL."""
    name = f"orch_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_dsn(admin), timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin.set(drivername="postgresql+asyncpg", database=name)


async def drop_database(admin: URL, database: URL) -> None:
    """Drop `database`, disconnecting whoever still uses it."""
    conn = await asyncpg.connect(_dsn(admin), timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database.database}" WITH (FORCE)')
    finally:
        await conn.close()


def _in_thread(coro: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion on a loop of its own, away from the tests' loop."""
    outcome: list[_T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(asyncio.run(coro()))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="test-database-setup")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _skip_or_fail(reason: str) -> NoReturn:
    message = f"no PostgreSQL for the store tests: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test module, as a `postgresql+asyncpg://` URL."""
    admin = admin_url()
    try:
        database = _in_thread(lambda: create_database(admin))
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        where = admin.render_as_string(hide_password=True)
        _skip_or_fail(f"{where} unreachable ({type(exc).__name__}: {exc})")
    yield database.render_as_string(hide_password=False)
    _in_thread(lambda: drop_database(admin, database))


async def drop_store_tables(url: str) -> None:
    """Drop every table of the saga store (and its migration stamp) from a PostgreSQL URL."""
    conn = await asyncpg.connect(_dsn(make_url(url)), timeout=5)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {', '.join(_TABLES)}")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database (no tables yet): a SQLite file, or the module's PostgreSQL one."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"
    url: str = request.getfixturevalue("postgres_url")
    await drop_store_tables(url)
    return url


@pytest.fixture
async def open_store(store_url: str) -> AsyncIterator[StoreOpener]:
    """Start stores on `store_url` (one per replica); all closed after the test."""
    stores: list[SqlSagaStore] = []

    async def open_(*, max_batch: int = 256) -> SqlSagaStore:
        store = SqlSagaStore(store_url, max_batch=max_batch)
        stores.append(store)
        await store.start()
        return store

    yield open_
    for store in stores:
        await store.close()


@pytest.fixture
async def store(open_store: StoreOpener) -> SqlSagaStore:
    """A started store on an empty database."""
    return await open_store()
