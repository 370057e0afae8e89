"""The saga store: every saga's state and step log, durable enough to recover from.

A saga is recorded when it begins, and its step log is written before and
after each step, so a process that dies mid-saga leaves enough behind for
another to finish the job: the completed steps, the saga's data as the last
step left it, and who was running it.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "FINAL_STATES",
    "BeginResult",
    "FacadeStore",
    "SagaPage",
    "SagaRecord",
    "SagaState",
    "SagaStore",
    "StepRecord",
    "StepState",
    "saga_key",
    "unscoped",
]


class SagaState(enum.StrEnum):
    """Where a saga stands."""

    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"


FINAL_STATES = frozenset(
    {SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.COMPENSATION_FAILED}
)
"""States a saga never leaves."""


class StepState(enum.StrEnum):
    """Where one step stands."""

    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step of a saga's log."""

    index: int
    name: str
    state: StepState
    attempts: int
    started_at: datetime
    finished_at: datetime | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class SagaRecord:
    """A saga as the store holds it."""

    request_id: str
    facade: str
    kind: str
    """`sync` or `async`."""
    state: SagaState
    payload: str
    """The request, as JSON: what the saga was asked to do."""
    payload_hash: str
    """A digest of `payload`: the same request id with another payload is another request."""
    data: str
    """The saga's data as JSON, as its last step left it (a sync response, an async DTO)."""
    owner: str
    """The replica running it (sync sagas), for recovery when that replica dies."""
    created_at: datetime
    updated_at: datetime
    error_code: str = ""
    error_reason: str = ""
    steps: Sequence[StepRecord] = field(default_factory=tuple)

    @property
    def finished(self) -> bool:
        """True once the saga is in a state it never leaves."""
        return self.state in FINAL_STATES

    @property
    def completed_steps(self) -> list[str]:
        """Names of the steps that finished, in order."""
        return [step.name for step in self.steps if step.state == StepState.DONE]


@dataclass(frozen=True, slots=True)
class BeginResult:
    """What `begin` found: a new saga, or the one already recorded under that request id."""

    created: bool
    existing: SagaRecord | None = None


@dataclass(frozen=True, slots=True)
class SagaPage:
    """One page of `list_sagas`, newest first."""

    sagas: Sequence[SagaRecord]
    next_page_token: str = ""


class SagaStore(abc.ABC):
    """Where sagas are recorded. Every write returns once it is durable."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and create the schema if it is missing."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush pending writes and disconnect."""

    @abc.abstractmethod
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
        """Record a new RUNNING saga, unless one exists under `request_id` (then return it).

        With `first_step`, a new saga's step 0 is recorded as started in the
        same durable write: a saga that runs at once needs one write, not two."""

    @abc.abstractmethod
    async def step_started(self, request_id: str, index: int, name: str) -> None:
        """Record that step `index` is about to run (again: its attempts grow by one).

        KeyError if no saga was begun under `request_id` (likewise for
        `step_finished` and `set_state`)."""

    @abc.abstractmethod
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
        """Record how step `index` ended and the saga's data after it.

        In the same durable write, `next_step` records step `index + 1` as
        started, and `saga_state` moves the saga as `set_state` would (with
        `error_code` and `error_reason`): a step's end and what follows it
        cost one write, not two."""

    @abc.abstractmethod
    async def set_state(
        self,
        request_id: str,
        state: SagaState,
        *,
        data: str | None = None,
        error_code: str = "",
        error_reason: str = "",
    ) -> None:
        """Move the saga to `state`; `data` None keeps the data, an empty error keeps the
        one recorded (a COMPENSATED saga still says why it was compensated)."""

    @abc.abstractmethod
    async def get(self, request_id: str) -> SagaRecord | None:
        """The saga with its step log, or None."""

    @abc.abstractmethod
    async def list_sagas(
        self,
        *,
        facade: str = "",
        state: SagaState | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> SagaPage:
        """Sagas newest first, filtered by facade and state, a page at a time."""

    @abc.abstractmethod
    async def heartbeat(self, owner: str) -> None:
        """Record that replica `owner` is alive now."""

    @abc.abstractmethod
    async def claim_orphans(self, owner: str, *, stale_after: float, kind: str) -> list[SagaRecord]:
        """Take over the RUNNING sagas of `kind` whose replica's heartbeat is older than
        `stale_after` seconds (or missing). Each orphan is claimed by exactly one caller,
        even with several replicas claiming at once; the claimed sagas are returned."""


def saga_key(facade: str, request_id: str) -> str:
    """The store key of a facade's saga: request ids are scoped by facade.

    A client may reuse one request id on two endpoints (the quick start does):
    those are two sagas, each idempotent on its own.
    """
    return f"{facade}/{request_id}"


def unscoped(saga: SagaRecord) -> SagaRecord:
    """`saga` with its key turned back into the caller's request id."""
    prefix = f"{saga.facade}/"
    if saga.request_id.startswith(prefix):
        return dataclasses.replace(saga, request_id=saga.request_id[len(prefix) :])
    return saga


class FacadeStore(SagaStore):
    """One facade's view of a store: it speaks request ids, the store keys them by facade.

    `on_change(request_id)` is called after each write that changed a saga (a
    watcher of the saga wakes up then, rather than at its next poll).
    """

    def __init__(
        self, store: SagaStore, facade: str, on_change: Callable[[str], None] | None = None
    ) -> None:
        self.store = store
        self.facade = facade
        self._on_change = on_change

    def _key(self, request_id: str) -> str:
        return saga_key(self.facade, request_id)

    def _changed(self, request_id: str) -> None:
        if self._on_change is not None:
            self._on_change(request_id)

    async def start(self) -> None:
        """The shared store is started by its Orchestrator."""

    async def close(self) -> None:
        """The shared store is closed by its Orchestrator."""

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
        """Begin under the facade's key."""
        begun = await self.store.begin(
            request_id=self._key(request_id),
            facade=facade,
            kind=kind,
            payload=payload,
            payload_hash=payload_hash,
            owner=owner,
            first_step=first_step,
        )
        if begun.existing is None:
            self._changed(request_id)
            return begun
        return BeginResult(created=begun.created, existing=unscoped(begun.existing))

    async def step_started(self, request_id: str, index: int, name: str) -> None:
        """See SagaStore."""
        await self.store.step_started(self._key(request_id), index, name)
        self._changed(request_id)

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
        """See SagaStore."""
        await self.store.step_finished(
            self._key(request_id),
            index,
            state=state,
            data=data,
            error=error,
            next_step=next_step,
            saga_state=saga_state,
            error_code=error_code,
            error_reason=error_reason,
        )
        self._changed(request_id)

    async def set_state(
        self,
        request_id: str,
        state: SagaState,
        *,
        data: str | None = None,
        error_code: str = "",
        error_reason: str = "",
    ) -> None:
        """See SagaStore."""
        await self.store.set_state(
            self._key(request_id),
            state,
            data=data,
            error_code=error_code,
            error_reason=error_reason,
        )
        self._changed(request_id)

    async def get(self, request_id: str) -> SagaRecord | None:
        """See SagaStore."""
        saga = await self.store.get(self._key(request_id))
        return None if saga is None else unscoped(saga)

    async def list_sagas(
        self,
        *,
        facade: str = "",
        state: SagaState | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> SagaPage:
        """This facade's sagas."""
        page = await self.store.list_sagas(
            facade=self.facade, state=state, page_size=page_size, page_token=page_token
        )
        return SagaPage([unscoped(saga) for saga in page.sagas], page.next_page_token)

    async def heartbeat(self, owner: str) -> None:
        """See SagaStore."""
        await self.store.heartbeat(owner)

    async def claim_orphans(self, owner: str, *, stale_after: float, kind: str) -> list[SagaRecord]:
        """The shared store's orphans (of every facade), with their request ids."""
        claimed = await self.store.claim_orphans(owner, stale_after=stale_after, kind=kind)
        orphans = [unscoped(saga) for saga in claimed]
        for saga in orphans:
            self._changed(saga.request_id)
        return orphans
