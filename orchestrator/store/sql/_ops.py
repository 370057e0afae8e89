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

from orchestrator.store.changes import Change
from orchestrator.store.records import NewSaga

__all__ = [
    "ApplyOp",
    "BatchFailed",
    "BeginOp",
    "ClaimOp",
    "HeartbeatOp",
    "JournalBroken",
    "Op",
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
