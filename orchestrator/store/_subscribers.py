"""The listeners of a store's change feed: who hears of each saga written, and of gaps."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from orchestrator.store.base import ChangeListener, GapListener

__all__ = ["Subscribers"]


class Subscribers:
    """`SagaStore.subscribe_changes`'s listeners, and telling them."""

    def __init__(self) -> None:
        self._changed: list[ChangeListener] = []
        self._gap: list[GapListener] = []

    def subscribe(self, changed: ChangeListener, gap: GapListener | None) -> Callable[[], None]:
        """Call `changed(facade, request_id)` for every saga announced and `gap()` when
        announcements may have been missed; returns a function that unsubscribes."""
        self._changed.append(changed)
        if gap is not None:
            self._gap.append(gap)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._changed.remove(changed)
            if gap is not None:
                with contextlib.suppress(ValueError):
                    self._gap.remove(gap)

        return unsubscribe

    def changed(self, facade: str, request_id: str) -> None:
        """Tell every listener that the saga was written."""
        for listener in list(self._changed):
            listener(facade, request_id)

    def gapped(self) -> None:
        """Tell every listener that announcements may have been missed."""
        for listener in list(self._gap):
            listener()
