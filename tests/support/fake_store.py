"""The in-memory saga store, instrumented: it tells how often and from where it was read."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from orchestrator.store import InMemorySagaStore, Position, SagaRecord
from orchestrator.store.base import ChangeListener, GapListener

__all__ = ["FakeSagaStore"]


class FakeSagaStore(InMemorySagaStore):
    """InMemorySagaStore that counts its reads (and records the task of each `get`); with
    `feed=False`, a store that announces no changes (as one without a change feed)."""

    def __init__(self, *, feed: bool = True) -> None:
        super().__init__()
        self._feed = feed
        self.gets = 0
        """How many times `get` was called (how often watchers polled)."""
        self.position_reads = 0
        """How many times `position` was called (how often callers waiting for an end read)."""
        self.readers: list[asyncio.Task[Any]] = []
        """The task of each `get` call, in order: a watch's server-side task."""

    @property
    def announces_changes(self) -> bool:
        """Whether it has a change feed (see `feed`)."""
        return self._feed

    def subscribe_changes(
        self,
        changed: ChangeListener,
        gap: GapListener | None = None,
        *,
        others_only: bool = False,
    ) -> Callable[[], None]:
        """The in-memory store's announcements, or (without a feed) none."""
        if self._feed:
            return super().subscribe_changes(changed, gap, others_only=others_only)
        return lambda: None

    async def position(self, facade: str, request_id: str) -> Position | None:
        """Where the saga stands, counting the read."""
        self.position_reads += 1
        return await super().position(facade, request_id)

    async def get(self, facade: str, request_id: str) -> SagaRecord | None:
        """The saga, counting the read and remembering who made it."""
        self.gets += 1
        task = asyncio.current_task()
        if task is not None:
            self.readers.append(task)
        return await super().get(facade, request_id)
