"""The saga store: every saga's state and step log, the journal the engine obeys.

A saga is recorded when it begins, and its step log is written before and
after each step, so a process that dies mid-saga leaves enough behind for
another to finish the job: the completed steps, the saga's data as the last
step left it, and who was running it. Every write after the begin is a
compare-and-set (see `orchestrator.store.changes`): the store applies it only
where the journal says the saga is, so messages and replicas cannot move a
saga on their own.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from orchestrator.store.changes import Change
from orchestrator.store.operator import (
    ActionRecord,
    DeadLetterPage,
    DeadLetterRecord,
    DeadLetterState,
    NewDeadLetter,
    OperatorChange,
)
from orchestrator.store.records import (
    NewSaga,
    Position,
    SagaPage,
    SagaRecord,
    SagaState,
    Stalled,
)

__all__ = ["CLAIM_BATCH", "MAX_PAGE_SIZE", "ChangeListener", "GapListener", "SagaStore"]

MAX_PAGE_SIZE = 500
"""Larger pages are cut to this, so one call cannot load the whole store."""
CLAIM_BATCH = 100
"""Most stalled sagas one `claim_stalled` call takes; the next call takes the rest."""

ChangeListener = Callable[[str, str], None]
"""`listener(facade, request_id)`: a committed write changed that saga."""
GapListener = Callable[[], None]
"""`listener()`: changes may have gone unannounced (the feed dropped or came back)."""


class SagaStore(abc.ABC):
    """Where sagas are recorded. Every write returns once it is durable."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect, and create or upgrade the schema."""

    @property
    def announces_changes(self) -> bool:
        """Whether every committed write, whichever replica made it, reaches the listeners of
        `subscribe_changes` right now. False by default: a store without such a feed leaves
        other replicas' writes to be found by reading (watchers poll)."""
        return False

    def subscribe_changes(
        self,
        changed: ChangeListener,
        gap: GapListener | None = None,
        *,
        others_only: bool = False,
    ) -> Callable[[], None]:
        """Hear of committed writes, this replica's and others', where the store can tell.

        `changed(facade, request_id)` is called on the event loop after a write
        to that saga committed; `gap()` when announcements may have been missed
        (the feed dropped, or came back): re-read whatever matters. Both must
        be quick and must not raise. Returns a function that unsubscribes. This
        default has no feed: nothing is ever called.

        With `others_only`, the writes this store object made itself are left
        out where its feed tells them apart (the SQL stores': on PostgreSQL by
        the notifying connection, on SQLite by the announcing process): for a
        listener that hears of those from the writer directly, as the engine
        does. A store that cannot tell (the in-memory one) tells it every write.
        """
        return _nothing

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush pending writes and disconnect."""

    @abc.abstractmethod
    async def begin(self, saga: NewSaga) -> SagaRecord | None:
        """Record a new RUNNING saga with its first step started, in one durable write.

        Returns None when it was created, or the saga already recorded under
        the same facade and request id (which is left as it is).
        """

    @abc.abstractmethod
    async def apply(self, facade: str, request_id: str, change: Change) -> bool:
        """Apply `change` if the saga stands where it expects; whether it was applied.

        A refused change (the saga is elsewhere, finished, or was never begun)
        changes nothing.
        """

    @abc.abstractmethod
    async def get(self, facade: str, request_id: str) -> SagaRecord | None:
        """The saga with its step log, or None."""

    async def position(self, facade: str, request_id: str) -> Position | None:
        """Where the saga stands, or None: the engine's check of each message, so a store
        may answer it with a lighter read than `get` (this one reads the whole record)."""
        saga = await self.get(facade, request_id)
        return None if saga is None else Position.of(saga)

    @abc.abstractmethod
    async def list_sagas(
        self,
        *,
        facade: str = "",
        state: SagaState | None = None,
        page_size: int = 50,
        page_token: str = "",
        request_id_prefix: str = "",
    ) -> SagaPage:
        """Sagas newest first, filtered by facade, state and the start of their request id
        (case-sensitive), a page at a time.

        `page_size` is cut to 1..`MAX_PAGE_SIZE`; a token this store did not issue
        raises ValueError.
        """

    @abc.abstractmethod
    async def count_sagas(
        self, *, facade: str = "", request_id_prefix: str = ""
    ) -> dict[SagaState, int]:
        """How many sagas are in each state, filtered as `list_sagas` filters them; a state
        no saga is in is left out."""

    @abc.abstractmethod
    async def heartbeat(self, owner: str) -> None:
        """Record that replica `owner` is alive now."""

    @abc.abstractmethod
    async def claim_stalled(
        self, owner: str, *, stale_after: float, hold_for: float
    ) -> list[Stalled]:
        """Take over up to `CLAIM_BATCH` sagas that nobody will drive to an end otherwise.

        A saga is stalled when it is RUNNING or COMPENSATING past its deadline,
        or when it is a RUNNING sync saga whose owner's heartbeat is older than
        `stale_after` seconds (or missing): a sync saga runs in its owner's
        process and dies with it. Each stalled saga goes to exactly one caller,
        even with several replicas claiming at once: it becomes `owner`'s, its
        deadline `hold_for` seconds away, and is returned as claimed, with why it
        stalled.
        """

    # --- operators -----------------------------------------------------------------------

    @abc.abstractmethod
    async def act(
        self,
        facade: str,
        request_id: str,
        change: Change | OperatorChange,
        action: ActionRecord,
    ) -> bool:
        """An operator's move: apply `change` as `apply` does (an `OperatorChange` may also
        move a COMPENSATION_FAILED saga) and record `action` on the saga, in one durable
        write; whether it was applied. Refused, neither is written."""

    @abc.abstractmethod
    async def actions(self, facade: str, request_id: str) -> list[ActionRecord]:
        """What operators did to the saga, oldest first."""

    @abc.abstractmethod
    async def add_dead_letter(self, letter: NewDeadLetter) -> bool:
        """Keep a dead letter, WAITING; False (and nothing changes) when its id is kept
        already."""

    @abc.abstractmethod
    async def get_dead_letter(self, letter_id: str) -> DeadLetterRecord | None:
        """The dead letter, or None."""

    @abc.abstractmethod
    async def list_dead_letters(
        self,
        *,
        topic: str = "",
        facade: str = "",
        state: DeadLetterState = DeadLetterState.WAITING,
        page_size: int = 50,
        page_token: str = "",
    ) -> DeadLetterPage:
        """Dead letters in `state`, newest first, filtered by topic and facade, a page at a
        time; `page_size` is cut to 1..`MAX_PAGE_SIZE`; a token this store did not issue
        raises ValueError."""

    @abc.abstractmethod
    async def settle_dead_letter(
        self, letter_id: str, state: DeadLetterState, action: ActionRecord
    ) -> bool:
        """Move a WAITING dead letter to `state` (REPLAYED or DISCARDED), settled by
        `action.actor` with `action.note`, and record `action` on its saga when the saga
        exists, in one durable write; False (nothing written) when it is not WAITING or
        not kept."""

    @abc.abstractmethod
    async def unsettle_dead_letter(self, letter_id: str) -> bool:
        """Undo a replay whose publish failed: a REPLAYED dead letter is WAITING again
        (settled_at, settled_by and note cleared) and the `replay` action naming it is
        removed from its saga's record, in one durable write; False when it is not
        REPLAYED."""


def _nothing() -> None:
    """Unsubscribing from a store without a change feed."""
