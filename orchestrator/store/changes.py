"""The writes that move a saga: each one a compare-and-set on where the saga stands.

The journal governs: a write names the state and the step it expects the saga
in, and the store applies it only if the saga is there, atomically, or refuses
it and changes nothing. So a duplicate message, a replica that lost its lease
or an operator acting at the same time can never move a saga twice, and a
finished saga (COMPLETED, COMPENSATED, COMPENSATION_FAILED) never moves again.

The invariant every write keeps: a RUNNING saga has exactly one current step
(RUNNING or PENDING), and a saga in any other state has none. Every way out of
RUNNING ends the current step in the same write, so the current step's row is
what concurrent writers contend on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from orchestrator.store.records import SagaState

__all__ = [
    "Change",
    "CompensationEnded",
    "StepEnded",
    "StepFailed",
    "StepPending",
    "StepRestarted",
]


@dataclass(frozen=True, slots=True)
class StepRestarted:
    """Another attempt of the current step (a redelivery, a repeated request).

    Expects step `index` current (RUNNING or PENDING): it becomes RUNNING with one
    attempt more.
    """

    index: int


@dataclass(frozen=True, slots=True)
class StepPending:
    """The current step's message never reached the broker: it waits to be published.

    Expects step `index` RUNNING.
    """

    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class StepEnded:
    """Step `index` succeeded, leaving the saga's data as `data`.

    Expects it RUNNING. In the same write, step `index + 1` (`next_step`) starts,
    or, with `complete`, the saga is COMPLETED.
    """

    index: int
    data: str
    next_step: str = ""
    complete: bool = False

    def __post_init__(self) -> None:
        if bool(self.next_step) == self.complete:
            raise ValueError("a step's end either starts the next step or completes the saga")


@dataclass(frozen=True, slots=True)
class StepFailed:
    """The current step failed (or the saga was stopped at it): the saga is rolled back.

    Expects step `index` current. It becomes FAILED with `reason`; the saga takes
    `code` and `reason` as its error and moves to `then`: COMPENSATING, with the
    steps in `undo` marked for compensation and `deadline_at` as the time its
    compensation has, or COMPENSATED at once when there is nothing to undo.
    `data`, when given, is the saga's data as the step left it.
    """

    index: int
    code: str
    reason: str
    undo: tuple[int, ...] = ()
    deadline_at: datetime | None = None
    then: SagaState = SagaState.COMPENSATING
    data: str | None = None

    def __post_init__(self) -> None:
        if self.then not in (SagaState.COMPENSATING, SagaState.COMPENSATED):
            raise ValueError(f"a failed step leads to COMPENSATING or COMPENSATED, not {self.then}")


@dataclass(frozen=True, slots=True)
class CompensationEnded:
    """The compensation of a COMPENSATING saga ended.

    Expects the saga COMPENSATING. The steps in `done` are recorded undone; with
    `state` COMPENSATION_FAILED, step `failed` is recorded as the one whose undoing
    failed, with `error`.
    """

    state: SagaState
    done: tuple[int, ...] = ()
    failed: int | None = None
    error: str = ""

    def __post_init__(self) -> None:
        if self.state not in (SagaState.COMPENSATED, SagaState.COMPENSATION_FAILED):
            raise ValueError(
                f"a compensation ends COMPENSATED or COMPENSATION_FAILED, not {self.state}"
            )


Change = StepRestarted | StepPending | StepEnded | StepFailed | CompensationEnded
"""Every write that moves a saga after it began."""
