"""A caller waiting for its saga's end: bounded by its deadline and the facade's max wait.

Throttling callers (and inline ones whose saga failed) get the saga's outcome
as a normal answer: the wait is `ended`, which looks at the saga's position
again only when a write to it is announced (this replica's at once, with the
position it left; every other replica's through the store's change feed).
It ends a little before the caller's gRPC deadline, so the caller hears
DEADLINE_EXCEEDED from us, naming the saga, rather than from its own timer,
and at the facade's `max_wait_seconds` at the latest. The saga goes on either
way (its own deadline bounds it), and GetSaga or WatchSaga tell its end; a
repeated request id waits on the same saga again.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from orchestrator.errors import DeadlineExceeded
from orchestrator.facade._watch import Watch
from orchestrator.retry import caller_deadline
from orchestrator.store import Position

if TYPE_CHECKING:
    from orchestrator.facade._runtime import SagaRuntime

__all__ = ["ANSWER_MARGIN_SECONDS", "RECHECK_SECONDS", "ended", "wait_for_end"]

ANSWER_MARGIN_SECONDS: Final = 0.25
"""Left of the caller's deadline when the wait gives up: time to answer it (at most a quarter
of what the caller had)."""
RECHECK_SECONDS: Final = 1.0
"""How long a wait trusts the change feed alone: after so long without a wake, the saga's
position is read again, so an announcement the feed lost without noticing (a store object
shared by two orchestrators, whose writes each takes for its own) costs that much, never
the whole wait."""
_EARLY_SECONDS: Final = 0.005
"""How early a recheck's timer may fire and still count as on time (the loop's clock
resolution)."""


async def wait_for_end(
    runtime: SagaRuntime, request_id: str, watch: Watch | None = None
) -> Position:
    """Where the saga of `request_id` stands once it reached a final state; DeadlineExceeded
    when the caller's deadline (less a margin) or the facade's `max_wait_seconds` comes
    first. `watch`: one the caller kept from before it began the saga (else a new one)."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    limit = runtime.policy.max_wait_seconds
    deadline = now + limit
    caller = caller_deadline.get()
    if caller is not None:
        left = caller - now
        deadline = min(deadline, caller - min(ANSWER_MARGIN_SECONDS, max(left, 0) / 4))
    try:
        async with asyncio.timeout_at(deadline):
            if watch is not None:
                return await ended(runtime, request_id, watch)
            with runtime.watching(request_id) as new:
                return await ended(runtime, request_id, new)
    except TimeoutError:
        waited = loop.time() - now
        raise DeadlineExceeded(
            f"{runtime.name} saga {request_id!r} had not ended after {waited:.1f}s of waiting "
            f"(at most {limit:g}s): it goes on; GetSaga or WatchSaga tell its end, and the "
            "same request waits on it again"
        ) from None


async def ended(runtime: SagaRuntime, request_id: str, watch: Watch) -> Position:
    """Where the saga stands once it reached a final state (the caller bounds the wait).

    Its position is read first, and again on every wake by another replica's
    write (or a gap in the change feed) and every `RECHECK_SECONDS` without
    one; a wake by this replica's own write tells the position it left, which
    needs no read (see `Watch`). While the store announces nothing, it is
    `SagaRuntime.wait_until`'s polling.
    """
    if runtime.store.announces_changes:
        loop = asyncio.get_running_loop()
        recheck = _Recheck(loop, watch)
        try:
            while runtime.store.announces_changes:
                position = watch.take()
                if position is None:
                    position = await runtime.store.position(runtime.name, request_id)
                    if position is None:
                        raise KeyError(f"no saga {runtime.name}/{request_id}")
                if position.finished:
                    return position
                recheck.since = loop.time()
                await watch.event.wait()  # every write heard, the feed dropping, a recheck
        finally:
            recheck.cancel()
    return Position.of(await runtime.wait_until(request_id, lambda saga: saga.finished))


class _Recheck:
    """Wakes a watch that heard nothing for `RECHECK_SECONDS` as if it heard a write, so its
    waiter reads the saga again. One timer for the whole wait, moved on only when it fires,
    rather than a timer made and cancelled at every wake (once per write heard, several
    times a saga; `asyncio.timeout` costs about 5 µs each time)."""

    __slots__ = ("_handle", "_loop", "_watch", "since")

    def __init__(self, loop: asyncio.AbstractEventLoop, watch: Watch) -> None:
        self._loop = loop
        self._watch = watch
        self.since = loop.time()
        """When the waiter last began to wait (a recheck is due `RECHECK_SECONDS` after)."""
        self._handle = loop.call_at(self.since + RECHECK_SECONDS, self._due)

    def _due(self) -> None:
        now = self._loop.time()
        # A timer may fire up to the loop's clock resolution early: that counts as on time.
        if now >= self.since + RECHECK_SECONDS - _EARLY_SECONDS:
            self._watch.heard()  # a write the feed never told: read again
            self.since = now
        self._handle = self._loop.call_at(self.since + RECHECK_SECONDS, self._due)

    def cancel(self) -> None:
        """Stop: the wait is over."""
        self._handle.cancel()
