"""What this replica last wrote of its sagas' positions: the journal's checks without a read.

Every hop message is checked against where its saga stands. Most arrive a few
milliseconds after this replica wrote that position (the previous hop's end),
so the position it wrote is the one the journal holds, and reading it back
costs a round to the store for nothing. `Positions` keeps the positions this
replica's own writes left, for `TTL` seconds, and the engine reads the store
only for the others: a saga another replica moved, or one written longer ago.

Only sagas in flight are kept: a finished saga leaves at once (a message for
it is rare, and is checked against the store), so what is kept stays small
and short-lived, which also keeps it cheap for the garbage collector. A
RUNNING saga could be moved by another replica (its recovery, an operator);
for at most `TTL` a hop could then be checked against the older position,
and its node run for a saga that moved on. The journal still decides what is
recorded (the hop's end is refused, counted, and nothing follows it), and an
idempotent upstream absorbs the call. A write this replica sees refused drops
the saga's position at once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from orchestrator.store import (
    Change,
    CompensationEnded,
    Position,
    SagaState,
    StepEnded,
    StepFailed,
    StepPending,
    StepRestarted,
    StepState,
)

__all__ = ["CAPACITY", "TTL", "Positions", "advanced"]

TTL: Final = 1.0
"""Seconds a saga's position written here is trusted without a read."""
CAPACITY: Final = 2048
"""Sagas in flight whose positions are kept (the most recently written)."""


class Positions:
    """The positions this replica wrote, newest last, each with when it was written."""

    def __init__(self, *, ttl: float = TTL, capacity: int = CAPACITY) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._kept: OrderedDict[str, tuple[float, Position]] = OrderedDict()

    def get(self, request_id: str, now: float) -> Position | None:
        """The position kept for `request_id` if it can still be trusted at `now`."""
        entry = self._kept.get(request_id)
        if entry is None:
            return None
        written, position = entry
        if now - written <= self._ttl:
            return position
        del self._kept[request_id]
        return None

    def put(self, request_id: str, position: Position, now: float) -> None:
        """Keep `position`, which a write of this replica (or a read) just saw; a finished
        saga's is not kept."""
        if position.finished:
            self._kept.pop(request_id, None)
            return
        self._kept[request_id] = (now, position)
        self._kept.move_to_end(request_id)
        if len(self._kept) > self._capacity:
            self._kept.popitem(last=False)

    def applied(self, request_id: str, change: Change, now: float) -> Position | None:
        """The journal applied `change`: move the kept position along, if one is kept (and
        trusted at `now`); the position it moved to (finished or not), or None."""
        kept = self.get(request_id, now)
        if kept is None:
            return None
        position = advanced(kept, change)
        self.put(request_id, position, now)
        return position

    def forget(self, request_id: str) -> None:
        """Drop what is kept of `request_id` (a refused write showed it was out of date)."""
        self._kept.pop(request_id, None)


def advanced(position: Position, change: Change) -> Position:
    """`position` after the journal applied `change` to it."""
    states = list(position.step_states)
    data = list(position.step_data)
    state = position.state
    if isinstance(change, CompensationEnded):
        state = change.state
    elif isinstance(change, StepRestarted):
        states[change.index], data[change.index] = StepState.RUNNING, None
    elif isinstance(change, StepPending):
        states[change.index] = StepState.PENDING
    elif isinstance(change, StepEnded):
        states[change.index], data[change.index] = StepState.DONE, change.data
        if change.complete:
            state = SagaState.COMPLETED
        else:
            states.append(StepState.RUNNING)
            data.append(None)
    elif isinstance(change, StepFailed):
        states[change.index] = StepState.FAILED
        if change.data is not None:
            data[change.index] = change.data
        state = change.then
    # Made directly: `dataclasses.replace` walks the fields in Python, on every write.
    return Position(state, position.payload, tuple(states), tuple(data))
