"""What the saga store holds: sagas, their steps, and where each stands.

A saga is identified by its facade and its request id: the same request id
sent to two facades is two sagas, each idempotent on its own.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "FINAL_STATES",
    "IN_PROCESS_KINDS",
    "MAX_KEY_LENGTH",
    "CompensationState",
    "NewSaga",
    "Position",
    "SagaPage",
    "SagaRecord",
    "SagaState",
    "Stalled",
    "StepRecord",
    "StepState",
]


MAX_KEY_LENGTH = 128
"""The longest facade name and request id a saga may have, in every store."""


IN_PROCESS_KINDS = ("sync", "inline")
"""Kinds of saga whose steps run in their owner's process, in its caller's call: a RUNNING
one whose owner stopped heartbeating is orphaned, and rolled back by another replica."""


class SagaState(enum.StrEnum):
    """Where a saga stands."""

    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"
    RESOLVED = "RESOLVED"
    """An operator settled it by hand."""


FINAL_STATES = frozenset(
    {
        SagaState.COMPLETED,
        SagaState.COMPENSATED,
        SagaState.COMPENSATION_FAILED,
        SagaState.RESOLVED,
    }
)
"""States a saga never leaves on its own: the store refuses every write of the engine to a
saga in one. Only an operator moves a COMPENSATION_FAILED saga again (`CompensationRetried`,
`Resolved`)."""


class StepState(enum.StrEnum):
    """Where one step stands."""

    RUNNING = "RUNNING"
    """Started (or about to be retried): the saga's current step."""
    DONE = "DONE"
    FAILED = "FAILED"
    PENDING = "PENDING"
    """The saga's current step, whose message never reached the broker: it runs once the
    request is repeated (or the saga's deadline rolls it back)."""


class CompensationState(enum.StrEnum):
    """Whether a step's effect is being, or was, undone."""

    NONE = ""
    """Nothing to undo (yet)."""
    PENDING = "PENDING"
    """The step may have taken effect and its saga is compensating."""
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
    data: str | None = None
    """The saga's data as this step's end left it (None until it ends)."""
    compensation: CompensationState = CompensationState.NONE
    compensated_at: datetime | None = None
    compensation_error: str = ""

    @property
    def current(self) -> bool:
        """True for the step a RUNNING saga is at: started (or waiting to be published)."""
        return self.state in (StepState.RUNNING, StepState.PENDING)


@dataclass(frozen=True, slots=True)
class SagaRecord:
    """A saga as the store holds it."""

    facade: str
    """The facade that runs it: with the request id, the saga's identity."""
    request_id: str
    kind: str
    """How it runs: `sync`, `async`, `throttling` or `inline`."""
    state: SagaState
    payload: str
    """The request, as JSON: what the saga was asked to do."""
    payload_hash: str
    """A digest of `payload`: the same request id with another payload is another request."""
    data: str
    """The saga's data as JSON, as its last finished step left it (a sync response, an async
    DTO); empty before any step finished."""
    owner: str
    """The replica that began it (or took it over), for recovery when that replica dies."""
    created_at: datetime
    updated_at: datetime
    deadline_at: datetime | None = None
    """By when it must reach an end (RUNNING) or finish compensating (COMPENSATING); past
    it, recovery drives it to one. None once it is finished."""
    error_code: str = ""
    error_reason: str = ""
    steps: Sequence[StepRecord] = field(default_factory=tuple)

    @property
    def finished(self) -> bool:
        """True once the saga is in a state it never leaves."""
        return self.state in FINAL_STATES

    @property
    def current_step(self) -> StepRecord | None:
        """The step a RUNNING saga is at; None in any other state."""
        if self.state != SagaState.RUNNING:
            return None
        return next((step for step in self.steps if step.current), None)

    @property
    def failed_step(self) -> StepRecord | None:
        """The step whose failure stopped the saga, if one did."""
        return next((step for step in self.steps if step.state == StepState.FAILED), None)

    @property
    def completed_steps(self) -> list[str]:
        """Names of the steps that finished, in order."""
        return [step.name for step in self.steps if step.state == StepState.DONE]

    def step(self, index: int) -> StepRecord | None:
        """Step `index` of the log, or None when it never started."""
        return next((step for step in self.steps if step.index == index), None)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a saga stands, and no more: what the engine checks a message against.

    A lighter read than the whole `SagaRecord`, for the hot path: the saga's
    state and payload, and each step's state and data, by index.
    """

    state: SagaState
    payload: str
    step_states: tuple[StepState, ...]
    step_data: tuple[str | None, ...]

    @property
    def finished(self) -> bool:
        """True once the saga is in a state it never leaves."""
        return self.state in FINAL_STATES

    @property
    def current(self) -> int | None:
        """The index of the step a RUNNING saga is at; None in any other state."""
        if self.state != SagaState.RUNNING:
            return None
        return next(
            (
                i
                for i, s in enumerate(self.step_states)
                if s in (StepState.RUNNING, StepState.PENDING)
            ),
            None,
        )

    @classmethod
    def of(cls, saga: SagaRecord) -> Position:
        """The position of a whole record."""
        return cls(
            saga.state,
            saga.payload,
            tuple(step.state for step in saga.steps),
            tuple(step.data for step in saga.steps),
        )


@dataclass(frozen=True, slots=True)
class NewSaga:
    """A saga to begin: RUNNING, its first step started, in one durable write."""

    facade: str
    request_id: str
    kind: str
    payload: str
    payload_hash: str
    owner: str
    first_step: str
    deadline_at: datetime | None

    def __post_init__(self) -> None:
        for name, value in (("facade", self.facade), ("request_id", self.request_id)):
            if not 0 < len(value) <= MAX_KEY_LENGTH:
                raise ValueError(f"a saga's {name} is 1 to {MAX_KEY_LENGTH} characters: {value!r}")


@dataclass(frozen=True, slots=True)
class Stalled:
    """A saga recovery took over, and why it stalled."""

    saga: SagaRecord
    expired: bool
    """True: it outlived its deadline; False: it is a sync saga whose replica went silent."""


@dataclass(frozen=True, slots=True)
class SagaPage:
    """One page of `list_sagas`, newest first."""

    sagas: Sequence[SagaRecord]
    next_page_token: str = ""
