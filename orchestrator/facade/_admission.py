"""Admission control: whether a facade takes one more call on this replica, and saturation.

Two limits refuse a new call before anything is started: `max_in_flight`
(the facade's calls in progress on this replica: sync runs, throttling and
inline callers waiting for their saga's end) and the length limit of the
facade's first topic (its queue refused the first hop: the broker raised
`QueueFull`). Either way the caller gets RESOURCE_EXHAUSTED carrying how
long to wait (`retry_after`, sent as `grpc-retry-pushback-ms`), and the
refusal is counted by facade and cause.

A facade is *saturated* while it is at its `max_in_flight`, or for
`retry_after` seconds after its first topic was found full; listeners hear of
every change, which is what the server's `admission` health name reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Final

from orchestrator.errors import ResourceExhausted
from orchestrator.metrics import FacadeMetrics

__all__ = ["MAX_IN_FLIGHT", "QUEUE_FULL", "Admission"]

log = logging.getLogger("orchestrator.facade")

MAX_IN_FLIGHT: Final = "max_in_flight"
"""Refusal cause: the facade had `max_in_flight` calls in progress on this replica."""
QUEUE_FULL: Final = "queue_full"
"""Refusal cause: the facade's first topic held as many messages as its length limit."""

SaturationListener = Callable[[bool], None]


class Admission:
    """One facade's admission on this replica: its calls in progress and its refusals."""

    def __init__(
        self, facade: str, *, max_in_flight: int, retry_after: float, metrics: FacadeMetrics
    ) -> None:
        self.facade = facade
        self.max_in_flight = max_in_flight
        """Calls in progress at most; 0: no limit."""
        self.retry_after = retry_after
        """Seconds a refused caller is asked to wait."""
        self.in_flight = 0
        """Calls admitted and not yet answered."""
        self._metrics = metrics
        self._full_until = 0.0  # loop time until which the first topic counts as full
        self._full_timer: asyncio.TimerHandle | None = None
        self._saturated = False
        self._listeners: list[SaturationListener] = []

    @property
    def saturated(self) -> bool:
        """True while a new call would be refused, or its first topic was just found full."""
        return self._saturated

    def on_saturation(self, listener: SaturationListener) -> None:
        """Call `listener(saturated)` on every change of `saturated`."""
        self._listeners.append(listener)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one call's place while the block runs; ResourceExhausted when there is none."""
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            raise self.refuse(
                MAX_IN_FLIGHT,
                f"{self.facade} has {self.in_flight} calls in progress on this replica, "
                f"its max_in_flight: try again in {self.retry_after:g}s",
            )
        self.in_flight += 1
        self._metrics.admitted.inc()
        self._refresh()
        try:
            yield
        finally:
            self.in_flight -= 1
            self._metrics.admitted.dec()
            self._refresh()

    def queue_full(self, topic: str) -> ResourceExhausted:
        """The refusal of a call whose first hop `topic`'s queue refused for its length; the
        facade counts as saturated for `retry_after` seconds."""
        loop = asyncio.get_running_loop()
        self._full_until = loop.time() + self.retry_after
        if self._full_timer is not None:
            self._full_timer.cancel()
        self._full_timer = loop.call_at(self._full_until, self._refresh)
        self._refresh()
        return self.refuse(
            QUEUE_FULL,
            f"{self.facade}'s topic {topic!r} is full (its max_length): "
            f"try again in {self.retry_after:g}s",
        )

    def refuse(self, cause: str, message: str) -> ResourceExhausted:
        """Count a refusal for `cause` and return the error the caller gets."""
        self._metrics.admission_refused(cause)
        log.info("call refused", extra={"facade": self.facade, "cause": cause})
        return ResourceExhausted(message, retry_after=self.retry_after)

    def _refresh(self) -> None:
        full = self._full_until > 0 and asyncio.get_running_loop().time() < self._full_until
        saturated = full or bool(self.max_in_flight and self.in_flight >= self.max_in_flight)
        if saturated == self._saturated:
            return
        self._saturated = saturated
        for listener in self._listeners:
            listener(saturated)
