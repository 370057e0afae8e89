"""A caller of this replica waiting on one saga, and what woke it.

This replica's own writes to the saga wake the watch with the position they
left (when the engine knows it: see `Positions`); every other replica's, heard
through the store's change feed, and a gap in that feed, wake it with nothing
known. A waiter that only needs the saga's position reads the store only for
the latter: the former told it already.
"""

from __future__ import annotations

import asyncio

from orchestrator.store import Position

__all__ = ["Watch"]


class Watch:
    """The wake-ups of one waiter on one saga (see the module docstring)."""

    __slots__ = ("_known", "_unknown", "event")

    def __init__(self, *, before_begin: bool = False) -> None:
        self.event = asyncio.Event()
        """Set on every write heard; the waiter clears it before it looks again."""
        self._known: Position | None = None
        # A watch kept from before its caller begins the saga has missed no write: its
        # first look reads only when no write of this replica told it where the saga is
        # (a saga begun before, by an earlier request). Any other's first look reads.
        self._unknown = not before_begin

    def wrote(self, position: Position | None) -> None:
        """This replica wrote the saga, leaving it at `position` (None: not known)."""
        if position is None:
            self._unknown = True
        else:
            self._known = position
        self.event.set()

    def heard(self) -> None:
        """Someone else wrote the saga (or the feed may have missed a write)."""
        self._unknown = True
        self.event.set()

    def take(self) -> Position | None:
        """Where this replica's own writes left the saga, when nothing else was heard of it
        since the last look (None: read the store), and clear the event: a write landing
        during the read that may follow wakes the next wait."""
        self.event.clear()
        if self._unknown:
            self._unknown = False
            self._known = None
            return None
        return self._known
