"""The writes queued to a SQL store's writer, and how a batch of them is grouped.

Each op carries the future its caller awaits; the writer resolves it once the
op's transaction committed (or failed). Ops of one saga keep their queue order;
ops of different sagas may be regrouped.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.store.changes import Change, CompensationEnded
from orchestrator.store.operator import ActionRecord, DeadLetterState, NewDeadLetter, OperatorChange
from orchestrator.store.records import NewSaga, SagaState

__all__ = [
    "ActOp",
    "AddDeadLetterOp",
    "ApplyOp",
    "BatchFailed",
    "BeginOp",
    "ClaimOp",
    "HeartbeatOp",
    "JournalBroken",
    "Op",
    "OperatorOp",
    "SettleDeadLetterOp",
    "UnsettleDeadLetterOp",
    "ended_reason",
    "rounds",
]


@dataclass(eq=False, slots=True)
class Op(abc.ABC):
    """One queued write; identity-hashed so a batch can map ops to outcomes."""

    at: datetime
    future: asyncio.Future[Any]

    @property
    @abc.abstractmethod
    def key(self) -> tuple[str, str, str]:
        """Ops with one key keep their queue order; others may be regrouped."""


@dataclass(eq=False, slots=True)
class BeginOp(Op):
    """A saga's begin; its outcome is whether it created the saga."""

    saga: NewSaga

    @property
    def key(self) -> tuple[str, str, str]:
        return ("s", self.saga.facade, self.saga.request_id)


@dataclass(eq=False, slots=True)
class ApplyOp(Op):
    """A change to a saga; its outcome is whether it was applied."""

    facade: str
    request_id: str
    change: Change

    @property
    def key(self) -> tuple[str, str, str]:
        return ("s", self.facade, self.request_id)


@dataclass(eq=False, slots=True)
class HeartbeatOp(Op):
    """A replica's heartbeat."""

    owner: str

    @property
    def key(self) -> tuple[str, str, str]:
        return ("r", self.owner, "")


@dataclass(eq=False, slots=True)
class ClaimOp(Op):
    """Taking over stalled sagas; its outcome is the (facade, request id) pairs claimed."""

    owner: str
    stale_before: datetime
    """Replicas whose heartbeat is older are dead."""
    hold_until: datetime
    """The claimed sagas' new deadline."""

    @property
    def key(self) -> tuple[str, str, str]:
        return ("c", self.owner, "")


@dataclass(eq=False, slots=True)
class OperatorOp(Op):
    """An operator's write: rare, so each is applied on its own, by plain statements, in
    the writer's transaction (after the engine's writes of its round)."""


@dataclass(eq=False, slots=True)
class ActOp(OperatorOp):
    """An operator's move of a saga with its action; its outcome is whether it was applied."""

    facade: str
    request_id: str
    change: Change | OperatorChange
    action: ActionRecord

    @property
    def key(self) -> tuple[str, str, str]:
        return ("s", self.facade, self.request_id)

    def as_apply(self) -> ApplyOp:
        """The engine's write of the same change (for an engine's `Change` only)."""
        change = self.change
        assert not isinstance(change, OperatorChange)
        return ApplyOp(self.at, self.future, self.facade, self.request_id, change)


@dataclass(eq=False, slots=True)
class AddDeadLetterOp(OperatorOp):
    """Keeping a dead letter; its outcome is whether it was new."""

    letter: NewDeadLetter

    @property
    def key(self) -> tuple[str, str, str]:
        return ("d", self.letter.id, "")


@dataclass(eq=False, slots=True)
class SettleDeadLetterOp(OperatorOp):
    """A WAITING dead letter replayed or discarded; its outcome is whether it was WAITING."""

    letter_id: str
    state: DeadLetterState
    action: ActionRecord

    @property
    def key(self) -> tuple[str, str, str]:
        return ("d", self.letter_id, "")


@dataclass(eq=False, slots=True)
class UnsettleDeadLetterOp(OperatorOp):
    """A REPLAYED dead letter WAITING again; its outcome is whether it was REPLAYED."""

    letter_id: str

    @property
    def key(self) -> tuple[str, str, str]:
        return ("d", self.letter_id, "")


class BatchFailed(Exception):
    """A batch's transaction failed; `isolate` says whether splitting it may help."""

    def __init__(self, cause: Exception, *, isolate: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.isolate = isolate


class JournalBroken(Exception):
    """A saga's current step moved but its row could not follow: the journal's invariant
    (see `orchestrator.store.changes`) is broken, and the op must not commit."""

    def __init__(self, facade: str, request_id: str) -> None:
        super().__init__(f"saga {facade}/{request_id} had a current step but was not RUNNING")


def rounds(ops: Sequence[Op]) -> list[list[Op]]:
    """Split a batch into rounds, each with at most one op per key, in queue order.

    Within a round the ops touch different sagas (or replicas), so they can be
    regrouped into one statement per kind of write; a saga's second queued op
    lands in the next round, after its first.
    """
    grouped: list[list[Op]] = []
    depth: dict[tuple[str, str, str], int] = {}
    for op in ops:
        n = depth.get(op.key, 0)
        depth[op.key] = n + 1
        if n == len(grouped):
            grouped.append([])
        grouped[n].append(op)
    return grouped


def ended_reason(change: CompensationEnded) -> str:
    """The saga's new error reason ("" keeps its own): only a failed compensation has one."""
    return change.error if change.state == SagaState.COMPENSATION_FAILED else ""
