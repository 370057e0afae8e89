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
        self._others: list[ChangeListener] = []
        self._gap: list[GapListener] = []

    def subscribe(
        self, changed: ChangeListener, gap: GapListener | None, *, others_only: bool = False
    ) -> Callable[[], None]:
        """Call `changed(facade, request_id)` for every saga announced (with `others_only`,
        only for the writes not this store's own) and `gap()` when announcements may have
        been missed; returns a function that unsubscribes."""
        listeners = self._others if others_only else self._changed
        listeners.append(changed)
        if gap is not None:
            self._gap.append(gap)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                listeners.remove(changed)
            if gap is not None:
                with contextlib.suppress(ValueError):
                    self._gap.remove(gap)

        return unsubscribe

    def changed(self, facade: str, request_id: str, *, own: bool = False) -> None:
        """Tell the listeners that the saga was written (`own`: by this store itself, which
        the listeners of others' writes do not hear)."""
        for listener in list(self._changed):
            listener(facade, request_id)
        if not own:
            for listener in list(self._others):
                listener(facade, request_id)

    def gapped(self) -> None:
        """Tell every listener that announcements may have been missed."""
        for listener in list(self._gap):
            listener()
