"""What operators see and do: their actions on sagas, and the dead-letter list.

An operator acts on a saga through `SagaStore.act`: the saga's move (one of
the engine's changes, or one of `OperatorChange`) and the `ActionRecord` that
says who did it, why and when are written in one transaction, or neither is.

A message that leaves its topic for good is kept as a dead letter, joined to
the saga it was for, until an operator replays it (it goes back on its topic)
or discards it. Either settles it, exactly once: a dead letter moves out of
WAITING once.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from orchestrator.store.records import MAX_KEY_LENGTH, SagaState

__all__ = [
    "RESOLVABLE",
    "ActionRecord",
    "CompensationRetried",
    "DeadLetterPage",
    "DeadLetterRecord",
    "DeadLetterState",
    "NewDeadLetter",
    "OperatorChange",
    "Resolved",
    "Retried",
]


@dataclass(frozen=True, slots=True)
class ActionRecord:
    """One thing an operator did to a saga, as its record keeps it."""

    action: str
    """`retry`, `compensate`, `resolve`, `replay` or `discard`."""
    actor: str
    """Who: the caller's identity (never a secret)."""
    note: str
    at: datetime
    dead_letter_id: str = ""
    """The dead letter a `replay` or `discard` settled."""

    def __post_init__(self) -> None:
        if not 0 < len(self.actor) <= MAX_KEY_LENGTH:
            raise ValueError(f"an actor is 1 to {MAX_KEY_LENGTH} characters: {self.actor!r}")


@dataclass(frozen=True, slots=True)
class Retried:
    """An operator runs a stuck RUNNING saga's current step again.

    Expects step `index` current (RUNNING or PENDING): it becomes RUNNING with
    one attempt more, and the saga's deadline moves to `deadline_at`.
    """

    index: int
    deadline_at: datetime


@dataclass(frozen=True, slots=True)
class CompensationRetried:
    """An operator runs a COMPENSATION_FAILED saga's remaining compensations again.

    Expects the saga COMPENSATION_FAILED: it becomes COMPENSATING with
    `deadline_at`, and the step whose undoing failed is PENDING again (what is
    DONE stays done).
    """

    deadline_at: datetime


@dataclass(frozen=True, slots=True)
class Resolved:
    """An operator settled the saga by hand: it ends RESOLVED.

    Expects the saga in state `expect` (RUNNING, COMPENSATING or
    COMPENSATION_FAILED): an operator acts on what they saw. A RUNNING saga's
    current step becomes FAILED with `reason`; the saga's deadline is cleared.
    """

    expect: SagaState
    reason: str

    def __post_init__(self) -> None:
        if self.expect not in RESOLVABLE:
            raise ValueError(f"a {self.expect} saga cannot be resolved")


RESOLVABLE = frozenset({SagaState.RUNNING, SagaState.COMPENSATING, SagaState.COMPENSATION_FAILED})
"""States an operator may resolve a saga from."""

OperatorChange = Retried | CompensationRetried | Resolved
"""The moves only an operator makes (through `SagaStore.act`)."""


class DeadLetterState(enum.StrEnum):
    """What became of a dead letter."""

    WAITING = "WAITING"
    REPLAYED = "REPLAYED"
    DISCARDED = "DISCARDED"


@dataclass(frozen=True, slots=True)
class NewDeadLetter:
    """A message that left its topic for good, to keep until an operator settles it."""

    id: str
    """Stable for the message's dead-lettering: keeping it again changes nothing."""
    topic: str
    facade: str
    """The saga the message was for ('' when it names none)."""
    request_id: str
    step: str
    message_id: str
    body: bytes
    headers: Mapping[str, str]
    reason: str
    delivery_count: int
    dead_lettered_at: datetime


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """A dead letter as the store keeps it."""

    id: str
    topic: str
    facade: str
    request_id: str
    step: str
    message_id: str
    body: bytes
    headers: Mapping[str, str]
    reason: str
    delivery_count: int
    dead_lettered_at: datetime
    state: DeadLetterState = DeadLetterState.WAITING
    settled_at: datetime | None = None
    settled_by: str = ""
    note: str = ""


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    """One page of `list_dead_letters`, newest first."""

    letters: Sequence[DeadLetterRecord] = field(default_factory=tuple)
    next_page_token: str = ""
