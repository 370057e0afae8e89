"""The pytest plugin of the test kit, registered by the package's `pytest11` entry point.

Fixtures, each overridable in a `conftest.py` or a test module:

- `orchestrator_facades`: the registration functions of the facades under
  test, each `register(orchestrator)`; override it (the default fails the
  test, saying so).
- `orchestrator_store_url`: the store (`memory://` by default); return
  `orchestrator_sqlite_url` for a SQLite file in the test's `tmp_path`.
- `orchestrator_kit`: a started `SagaKit` with those facades, closed after
  the test. It is an async fixture: it needs pytest-asyncio (any mode).

The names all start with `orchestrator_`, so they do not clash with a
project's own `broker` or `orchestrator` fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from orchestrator.testing._kit import Registration, SagaKit

try:
    from pytest_asyncio import fixture as _async_fixture
except ImportError:  # pragma: no cover - pytest-asyncio is how the kit's fixture runs
    _async_fixture = pytest.fixture  # type: ignore[assignment]

__all__ = [
    "orchestrator_facades",
    "orchestrator_kit",
    "orchestrator_sqlite_url",
    "orchestrator_store_url",
]


@pytest.fixture
def orchestrator_facades() -> Sequence[Registration]:
    """The registration functions of the facades under test: override this fixture."""
    pytest.fail(
        "orchestrator_kit needs your facades: define a fixture `orchestrator_facades` "
        "returning their registration functions, e.g. [lambda o: register_trip(o, services)]",
        pytrace=False,
    )


@pytest.fixture
def orchestrator_store_url() -> str:
    """The kit's saga store: in memory unless overridden."""
    return "memory://"


@pytest.fixture
def orchestrator_sqlite_url(tmp_path: Path) -> str:
    """A SQLite saga store in the test's own temporary directory."""
    return f"sqlite+aiosqlite:///{tmp_path / 'orchestrator.db'}"


@_async_fixture
async def orchestrator_kit(
    orchestrator_facades: Sequence[Registration], orchestrator_store_url: str
) -> AsyncIterator[SagaKit]:
    """A started SagaKit running `orchestrator_facades` on `orchestrator_store_url`."""
    async with SagaKit(*orchestrator_facades, store_url=orchestrator_store_url) as kit:
        yield kit
