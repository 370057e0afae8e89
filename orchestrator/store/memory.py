"""A saga store in process memory, with the SQL store's semantics, for unit tests.

It survives nothing but itself: production uses `SqlSagaStore`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import UTC, datetime, timedelta

from orchestrator.store.base import (
    BeginResult,
    SagaPage,
    SagaRecord,
    SagaState,
    SagaStore,
    StepRecord,
    StepState,
)

__all__ = ["InMemorySagaStore"]


class InMemorySagaStore(SagaStore):
    """Sagas in a dict; every write is "durable" at once.

    Its clock only moves forward, by at least a microsecond a write, so every
    write changes `updated_at` and "newest first" is never a tie.
    """

    def __init__(self) -> None:
        self._sagas: dict[str, SagaRecord] = {}
        self._heartbeats: dict[str, datetime] = {}
        self._last = datetime.min.replace(tzinfo=UTC)

    def _now(self) -> datetime:
        self._last = max(datetime.now(UTC), self._last + timedelta(microseconds=1))
        return self._last

    async def start(self) -> None:
        """Nothing to connect to."""

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
        first_step: str = "",
    ) -> BeginResult:
        """Record a new saga (with its first step started), or return the one already there."""
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
            data="",
            owner=owner,
            created_at=now,
            updated_at=now,
        )
        if first_step:
            self._start_step(request_id, 0, first_step)
        return BeginResult(created=True)

    async def step_started(self, request_id: str, index: int, name: str) -> None:
        """Record an attempt of step `index`; KeyError for a saga never begun."""
        self._start_step(request_id, index, name)

    def _start_step(self, request_id: str, index: int, name: str) -> None:
        saga = self._sagas[request_id]
        steps = {step.index: step for step in saga.steps}
        previous = steps.get(index)
        steps[index] = StepRecord(
            index=index,
            name=name,
            state=StepState.RUNNING,
            attempts=(previous.attempts if previous else 0) + 1,
            started_at=self._now(),
        )
        self._replace(saga, steps=tuple(steps[i] for i in sorted(steps)))

    async def step_finished(
        self,
        request_id: str,
        index: int,
        *,
        state: StepState,
        data: str,
        error: str = "",
        next_step: str = "",
        saga_state: SagaState | None = None,
        error_code: str = "",
        error_reason: str = "",
    ) -> None:
        """Record how step `index` ended and the saga's data after it, then what follows."""
        saga = self._sagas[request_id]
        steps = [
            dataclasses.replace(step, state=state, finished_at=self._now(), error=error)
            if step.index == index
            else step
            for step in saga.steps
        ]
        self._replace(saga, steps=tuple(steps), data=data)
        if next_step:
            self._start_step(request_id, index + 1, next_step)
        if saga_state is not None:
            self._move(request_id, saga_state, None, error_code, error_reason)

    async def set_state(
        self,
        request_id: str,
        state: SagaState,
        *,
        data: str | None = None,
        error_code: str = "",
        error_reason: str = "",
    ) -> None:
        """Move the saga to `state`; KeyError for a saga never begun."""
        self._move(request_id, state, data, error_code, error_reason)

    def _move(
        self,
        request_id: str,
        state: SagaState,
        data: str | None,
        error_code: str,
        error_reason: str,
    ) -> None:
        saga = self._sagas[request_id]
        self._replace(
            saga,
            state=state,
            data=saga.data if data is None else data,
            error_code=error_code or saga.error_code,
            error_reason=error_reason or saga.error_reason,
        )

    async def get(self, request_id: str) -> SagaRecord | None:
        """The saga, or None."""
        return self._sagas.get(request_id)

    async def list_sagas(
        self,
        *,
        facade: str = "",
        state: SagaState | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> SagaPage:
        """Newest first, a page at a time; a bad token raises ValueError."""
        page_size = max(1, min(page_size, 500))
        ordered = sorted(
            self._sagas.values(), key=lambda s: (s.created_at, s.request_id), reverse=True
        )
        matching = [
            saga
            for saga in ordered
            if (not facade or saga.facade == facade) and (state is None or saga.state == state)
        ]
        if page_token:
            after = _decode(page_token)
            matching = [s for s in matching if (s.created_at.isoformat(), s.request_id) < after]
        page = matching[:page_size]
        token = _encode(page[-1]) if len(matching) > page_size else ""
        return SagaPage(sagas=page, next_page_token=token)

    async def heartbeat(self, owner: str) -> None:
        """Record that `owner` is alive."""
        self._heartbeats[owner] = self._now()

    async def claim_orphans(self, owner: str, *, stale_after: float, kind: str) -> list[SagaRecord]:
        """Take over the running sagas of replicas whose heartbeat went stale."""
        cutoff = self._now() - timedelta(seconds=stale_after)
        claimed = []
        for saga in list(self._sagas.values()):
            beat = self._heartbeats.get(saga.owner)
            if (
                saga.state == SagaState.RUNNING
                and saga.kind == kind
                and saga.owner != owner
                and (beat is None or beat < cutoff)
            ):
                claimed.append(self._replace(saga, owner=owner))
        return claimed

    def _replace(self, saga: SagaRecord, **changes: object) -> SagaRecord:
        updated = dataclasses.replace(saga, updated_at=self._now(), **changes)  # type: ignore[arg-type]
        self._sagas[saga.request_id] = updated
        return updated


def _encode(saga: SagaRecord) -> str:
    raw = json.dumps([saga.created_at.isoformat(), saga.request_id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode(token: str) -> tuple[str, str]:
    try:
        created_at, request_id = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError) as exc:
        raise ValueError("invalid page token") from exc
    return str(created_at), str(request_id)
