"""Pages that follow sagas live: Server-Sent Events fed by the store's change notifications.

`ChangeHub` hears every saga write this process makes
(`Orchestrator.on_saga_change`, as the status service's watchers do) and
those of other replicas the store announces (`SagaStore.subscribe_changes`:
LISTEN/NOTIFY on PostgreSQL). Each open live page holds one `asyncio.Event`
in it; a write sets them all and does nothing else, so the saga's own path
pays one call and a loop over the open pages (none, most of the time).

`stream` sends a page's fragment, rendered again once it was woken, at most
once every `min_interval` seconds (a burst of writes is one update) and only
when it changed; pages that show the same view share one render per change
(`SharedRenders`). A saga's page follows `WatchSaga` itself instead (see
`Console`), the same notifications through the status service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from typing import Any, TypeVar

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

from orchestrator.registry import Orchestrator

__all__ = [
    "END_EVENT",
    "PING_SECONDS",
    "UPDATE_EVENT",
    "ChangeHub",
    "LiveStreams",
    "SharedRenders",
    "opened",
    "stream",
    "unless_gone",
]

log = logging.getLogger("orchestrator.console")

T = TypeVar("T")

PING_SECONDS = 10.0
"""A comment line keeps each stream alive this often, and finds a browser that left."""
UPDATE_EVENT = "update"
"""The event that carries a page's new fragment (HTML, escaped like the page)."""
END_EVENT = "end"
"""The event after which nothing more comes (the saga ended): the page stops listening."""


class ChangeHub:
    """Fans the news that some saga changed out to every live page."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self._pages: set[asyncio.Event] = set()
        self.generation = 0
        """How many changes were heard of: a fragment rendered at one generation shows every
        change up to it."""
        self._unsubscribe = (
            orchestrator.on_saga_change(self._changed),
            orchestrator.store.subscribe_changes(self._changed, self._everything),
        )

    @property
    def pages(self) -> int:
        """Live pages open now."""
        return len(self._pages)

    def _changed(self, facade: str, request_id: str) -> None:
        self.generation += 1
        for page in self._pages:
            page.set()

    def _everything(self) -> None:
        self.generation += 1
        for page in self._pages:
            page.set()

    @contextlib.contextmanager
    def listening(self) -> Iterator[asyncio.Event]:
        """An event set at every change while the block runs (set at first, too)."""
        page = asyncio.Event()
        page.set()
        self._pages.add(page)
        try:
            yield page
        finally:
            self._pages.discard(page)

    def close(self) -> None:
        """Stop hearing of changes."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()


class SharedRenders:
    """The latest fragment of each live view, so that pages showing the same view (the same
    filters) render it once per change, however many are open."""

    def __init__(self, hub: ChangeHub, *, keep: int = 64) -> None:
        self._hub = hub
        self._keep = keep
        self._latest: OrderedDict[Hashable, tuple[int, str]] = OrderedDict()

    async def fragment(self, view: Hashable, render: Callable[[], Awaitable[str]]) -> str:
        """`view`'s fragment as of now: the one rendered since the latest change, or a new one."""
        generation = self._hub.generation  # read first: a change during the render is newer
        latest = self._latest.get(view)
        if latest is not None and latest[0] == generation:
            self._latest.move_to_end(view)
            return latest[1]
        fragment = await render()
        self._latest[view] = (generation, fragment)
        self._latest.move_to_end(view)
        while len(self._latest) > self._keep:
            self._latest.popitem(last=False)
        return fragment


class LiveStreams:
    """The tasks of the open streams, so that a closing console ends them at once."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        """Count the running task as a stream while the block runs."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            yield
        finally:
            self._tasks.discard(task)

    def cancel_all(self) -> None:
        """End every open stream (the browser reconnects to whatever serves next)."""
        for task in list(self._tasks):
            task.cancel()


@contextlib.asynccontextmanager
async def opened(
    request: web.Request,
) -> AsyncIterator[tuple[EventSourceResponse, asyncio.Future[None]]]:
    """An event stream to the browser, and a future done once the browser is gone."""
    async with sse_response(
        request, headers={"Cache-Control": "no-store"}, ping_interval=PING_SECONDS
    ) as events:
        gone = asyncio.ensure_future(events.wait())
        try:
            yield events, gone
        finally:
            gone.cancel()


async def unless_gone(
    gone: asyncio.Future[None], waiting: Awaitable[T]
) -> asyncio.Future[T] | None:
    """Wait for `waiting` and return it done; None (and `waiting` cancelled) if the browser
    left first."""
    task: asyncio.Future[T] = asyncio.ensure_future(waiting)
    either: set[asyncio.Future[Any]] = {task, gone}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
    return task if task.done() and not task.cancelled() else None


async def stream(
    request: web.Request,
    hub: ChangeHub,
    render: Callable[[], Awaitable[str]],
    *,
    min_interval: float,
) -> web.StreamResponse:
    """Send `render()` each time a change woke the page (at most every `min_interval`
    seconds, and only when it differs from what was sent last)."""
    async with opened(request) as (events, gone):
        with hub.listening() as woken:
            sent = None
            while await unless_gone(gone, woken.wait()) is not None:
                woken.clear()
                fragment = await render()
                if fragment != sent:
                    await events.send(fragment, event=UPDATE_EVENT)
                    sent = fragment
                await asyncio.sleep(min_interval)
    return events
