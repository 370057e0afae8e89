"""The in-memory saga store, instrumented: it tells how often and from where it was read."""

from __future__ import annotations

import asyncio
from typing import Any

from orchestrator.store import InMemorySagaStore, SagaRecord

__all__ = ["FakeSagaStore"]


class FakeSagaStore(InMemorySagaStore):
    """InMemorySagaStore that counts its reads and records the task of each."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0
        """How many times `get` was called (how often watchers polled)."""
        self.readers: list[asyncio.Task[Any]] = []
        """The task of each `get` call, in order: a watch's server-side task."""

    async def get(self, facade: str, request_id: str) -> SagaRecord | None:
        """The saga, counting the read and remembering who made it."""
        self.gets += 1
        task = asyncio.current_task()
        if task is not None:
            self.readers.append(task)
        return await super().get(facade, request_id)
