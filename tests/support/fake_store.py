"""An in-memory SagaStore for the tests: every method of the ABC, nothing durable.

Its clock only moves forward, by at least a microsecond a write, so every
write changes `updated_at` and "newest first" is never a tie.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator.store.base import (
    BeginResult,
    SagaPage,
    SagaRecord,
    SagaState,
    SagaStore,
    StepRecord,
    StepState,
)

__all__ = ["FakeSagaStore"]

_TOKEN_PREFIX = "offset:"


class FakeSagaStore(SagaStore):
    """Sagas in a dict. `list_sagas` raises ValueError for a page token it did not issue."""

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self._clock = clock or (lambda: datetime.now(UTC))
        self._last = datetime.min.replace(tzinfo=UTC)
        self._sagas: dict[str, SagaRecord] = {}
        self._heartbeats: dict[str, datetime] = {}
        self.gets = 0
        """How many times `get` was called (how often watchers polled)."""
        self.readers: list[asyncio.Task[Any]] = []
        """The task of each `get` call, in order: a watch's server-side task."""

    def _now(self) -> datetime:
        self._last = max(self._clock(), self._last + timedelta(microseconds=1))
        return self._last

    def _update(self, request_id: str, **changes: Any) -> SagaRecord:
        record = self._sagas.get(request_id)
        if record is None:
            raise KeyError(f"no saga {request_id!r}")
        updated = dataclasses.replace(record, updated_at=self._now(), **changes)
        self._sagas[request_id] = updated
        return updated

    async def start(self) -> None:
        """Nothing to connect."""

    async def close(self) -> None:
        """Nothing to flush."""

    async def begin(
        self,
        *,
        request_id: str,
        facade: str,
        kind: str,
        payload: str,
        payload_hash: str,
        owner: str,
    ) -> BeginResult:
        existing = self._sagas.get(request_id)
        if existing is not None:
            return BeginResult(created=False, existing=existing)
        now = self._now()
        self._sagas[request_id] = SagaRecord(
            request_id=request_id,
            facade=facade,
            kind=kind,
            state=SagaState.RUNNING,
            payload=payload,
            payload_hash=payload_hash,
            data="{}",
            owner=owner,
            created_at=now,
            updated_at=now,
        )
        return BeginResult(created=True)

    async def step_started(self, request_id: str, index: int, name: str) -> None:
        record = self._sagas[request_id]
        steps = {step.index: step for step in record.steps}
        previous = steps.get(index)
        steps[index] = StepRecord(
            index=index,
            name=name,
            state=StepState.RUNNING,
            attempts=(previous.attempts if previous else 0) + 1,
            started_at=self._now(),
        )
        self._update(request_id, steps=tuple(steps[i] for i in sorted(steps)))

    async def step_finished(
        self, request_id: str, index: int, *, state: StepState, data: str, error: str = ""
    ) -> None:
        record = self._sagas[request_id]
        finished_at = self._now()
        steps = tuple(
            dataclasses.replace(step, state=state, finished_at=finished_at, error=error)
            if step.index == index
            else step
            for step in record.steps
        )
        self._update(request_id, steps=steps, data=data)

    async def set_state(
        self,
        request_id: str,
        state: SagaState,
        *,
        data: str | None = None,
        error_code: str = "",
        error_reason: str = "",
    ) -> None:
        record = self._sagas[request_id]
        self._update(
            request_id,
            state=state,
            data=record.data if data is None else data,
            error_code=error_code,
            error_reason=error_reason,
        )

    async def get(self, request_id: str) -> SagaRecord | None:
        self.gets += 1
        task = asyncio.current_task()
        if task is not None and task not in self.readers:
            self.readers.append(task)
        return self._sagas.get(request_id)

    async def list_sagas(
        self,
        *,
        facade: str = "",
        state: SagaState | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> SagaPage:
        offset = _decode_token(page_token)
        matching = [
            record
            for record in self._sagas.values()
            if (not facade or record.facade == facade) and (state is None or record.state == state)
        ]
        matching.sort(key=lambda record: record.created_at, reverse=True)
        page = matching[offset : offset + page_size]
        end = offset + len(page)
        next_page_token = f"{_TOKEN_PREFIX}{end}" if end < len(matching) else ""
        return SagaPage(sagas=page, next_page_token=next_page_token)

    async def heartbeat(self, owner: str) -> None:
        self._heartbeats[owner] = self._now()

    async def claim_orphans(self, owner: str, *, stale_after: float, kind: str) -> list[SagaRecord]:
        now = self._now()
        claimed: list[SagaRecord] = []
        for record in list(self._sagas.values()):
            if record.kind != kind or record.state != SagaState.RUNNING or record.owner == owner:
                continue
            seen = self._heartbeats.get(record.owner)
            if seen is None or (now - seen).total_seconds() > stale_after:
                claimed.append(self._update(record.request_id, owner=owner))
        return claimed


def _decode_token(token: str) -> int:
    """The offset a page token stands for; ValueError for one this store did not issue."""
    if not token:
        return 0
    digits = token.removeprefix(_TOKEN_PREFIX)
    if digits == token or not digits.isdigit():
        raise ValueError(f"page token {token!r} was not issued by this store")
    return int(digits)
