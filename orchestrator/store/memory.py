"""A saga store in process memory, with the SQL store's semantics.

It survives nothing but itself: sagas are recorded (so requests are idempotent
and the journal governs) for as long as the process lives. It backs the
embedded default when no store URL is configured, and fast unit tests;
production uses `SqlSagaStore`. Finished sagas beyond `max_finished` are
forgotten, oldest first, so a long-running process does not grow without end.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections import Counter, OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from orchestrator.store._subscribers import Subscribers
from orchestrator.store.base import (
    CLAIM_BATCH,
    MAX_PAGE_SIZE,
    ChangeListener,
    GapListener,
    SagaStore,
)
from orchestrator.store.changes import (
    Change,
    CompensationEnded,
    StepEnded,
    StepFailed,
    StepPending,
    StepRestarted,
)
from orchestrator.store.operator import (
    ActionRecord,
    CompensationRetried,
    DeadLetterPage,
    DeadLetterRecord,
    DeadLetterState,
    NewDeadLetter,
    OperatorChange,
    Resolved,
    Retried,
)
from orchestrator.store.records import (
    IN_PROCESS_KINDS,
    CompensationState,
    NewSaga,
    Position,
    SagaPage,
    SagaRecord,
    SagaState,
    Stalled,
    StepRecord,
    StepState,
)

__all__ = ["InMemorySagaStore", "operator_transition", "transition"]

_Key = tuple[str, str]


class InMemorySagaStore(SagaStore):
    """Sagas in a dict; every write is "durable" at once.

    Its clock only moves forward, by at least a microsecond a write, so every
    write changes `updated_at` and "newest first" is never a tie.
    """

    def __init__(self, *, max_finished: int = 100_000) -> None:
        if max_finished < 1:
            raise ValueError("max_finished must be at least 1")
        self._sagas: dict[_Key, SagaRecord] = {}
        self._finished: OrderedDict[_Key, None] = OrderedDict()
        self._max_finished = max_finished
        self._heartbeats: dict[str, datetime] = {}
        self._actions: dict[_Key, list[ActionRecord]] = {}
        self._letters: dict[str, DeadLetterRecord] = {}
        self._last = datetime.min.replace(tzinfo=UTC)
        self._subscribers = Subscribers()

    @property
    def announces_changes(self) -> bool:
        """True: every write to it is made in this process, and announced at once."""
        return True

    def subscribe_changes(
        self,
        changed: ChangeListener,
        gap: GapListener | None = None,
        *,
        others_only: bool = False,
    ) -> Callable[[], None]:
        """Call `changed(facade, request_id)` after every write to a saga (there are no gaps:
        `gap` is never called); returns a function that unsubscribes. Every write is told,
        `others_only` or not: several orchestrators in a process may share this store, and
        it cannot tell whose a write is."""
        return self._subscribers.subscribe(changed, gap)

    def _announce(self, key: _Key) -> None:
        self._subscribers.changed(*key)

    def _now(self) -> datetime:
        self._last = max(datetime.now(UTC), self._last + timedelta(microseconds=1))
        return self._last

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to flush."""

    async def begin(self, saga: NewSaga) -> SagaRecord | None:
        """Record a new saga with its first step started, or return the one already there."""
        key = (saga.facade, saga.request_id)
        existing = self._sagas.get(key)
        if existing is not None:
            return existing
        now = self._now()
        self._sagas[key] = SagaRecord(
            facade=saga.facade,
            request_id=saga.request_id,
            kind=saga.kind,
            state=SagaState.RUNNING,
            payload=saga.payload,
            payload_hash=saga.payload_hash,
            data="",
            owner=saga.owner,
            created_at=now,
            updated_at=now,
            deadline_at=saga.deadline_at,
            steps=(StepRecord(0, saga.first_step, StepState.RUNNING, 1, now),),
        )
        self._announce(key)
        return None

    async def apply(self, facade: str, request_id: str, change: Change) -> bool:
        """Apply `change` where the saga stands as it expects; False (nothing changed) else."""
        key = (facade, request_id)
        saga = self._sagas.get(key)
        if saga is None:
            return False
        moved = transition(saga, change, self._now())
        if moved is None:
            return False
        self._sagas[key] = moved
        if moved.finished:
            self._forget_old(key)
        self._announce(key)
        return True

    def _forget_old(self, key: _Key) -> None:
        self._finished[key] = None
        while len(self._finished) > self._max_finished:
            oldest, _ = self._finished.popitem(last=False)
            self._sagas.pop(oldest, None)
            self._actions.pop(oldest, None)

    async def get(self, facade: str, request_id: str) -> SagaRecord | None:
        """The saga, or None."""
        return self._sagas.get((facade, request_id))

    async def position(self, facade: str, request_id: str) -> Position | None:
        """Where the saga stands, or None."""
        saga = self._sagas.get((facade, request_id))
        return None if saga is None else Position.of(saga)

    async def list_sagas(
        self,
        *,
        facade: str = "",
        state: SagaState | None = None,
        page_size: int = 50,
        page_token: str = "",
        request_id_prefix: str = "",
    ) -> SagaPage:
        """Newest first, a page at a time; a bad token raises ValueError."""
        page_size = max(1, min(page_size, MAX_PAGE_SIZE))
        ordered = sorted(self._sagas.values(), key=_position, reverse=True)
        matching = [
            saga
            for saga in ordered
            if _matches(saga, facade, request_id_prefix) and (state is None or saga.state == state)
        ]
        if page_token:
            after = _decode(page_token)
            matching = [saga for saga in matching if _position(saga) < after]
        page = matching[:page_size]
        token = _encode(page[-1]) if len(matching) > page_size else ""
        return SagaPage(sagas=page, next_page_token=token)

    async def count_sagas(
        self, *, facade: str = "", request_id_prefix: str = ""
    ) -> dict[SagaState, int]:
        """How many sagas are in each state."""
        counts = Counter(
            saga.state for saga in self._sagas.values() if _matches(saga, facade, request_id_prefix)
        )
        return dict(counts)

    async def heartbeat(self, owner: str) -> None:
        """Record that `owner` is alive."""
        self._heartbeats[owner] = self._now()

    async def claim_stalled(
        self, owner: str, *, stale_after: float, hold_for: float
    ) -> list[Stalled]:
        """Take over the sagas past their deadline and the sync ones of dead replicas."""
        now = self._now()
        cutoff = now - timedelta(seconds=stale_after)
        claimed: list[Stalled] = []
        for key, saga in sorted(self._sagas.items(), key=lambda item: item[1].created_at):
            if len(claimed) == CLAIM_BATCH:
                break
            if saga.state not in (SagaState.RUNNING, SagaState.COMPENSATING):
                continue
            beat = self._heartbeats.get(saga.owner)
            expired = saga.deadline_at is not None and saga.deadline_at < now
            orphaned = (
                saga.state == SagaState.RUNNING
                and saga.kind in IN_PROCESS_KINDS
                and saga.owner != owner
                and (beat is None or beat < cutoff)
            )
            if expired or orphaned:
                taken = dataclasses.replace(
                    saga, owner=owner, deadline_at=now + timedelta(seconds=hold_for), updated_at=now
                )
                self._sagas[key] = taken
                claimed.append(Stalled(taken, expired=expired))
        return claimed

    # --- operators ----------------------------------------------------------------------

    async def act(
        self,
        facade: str,
        request_id: str,
        change: Change | OperatorChange,
        action: ActionRecord,
    ) -> bool:
        """Apply an operator's move and record `action` with it; False (neither) if refused."""
        key = (facade, request_id)
        saga = self._sagas.get(key)
        if saga is None:
            return False
        now = self._now()
        if isinstance(change, Retried | CompensationRetried | Resolved):
            moved = operator_transition(saga, change, now)
        else:
            moved = transition(saga, change, now)
        if moved is None:
            return False
        self._sagas[key] = moved
        self._actions.setdefault(key, []).append(action)
        if moved.finished:
            self._forget_old(key)
        else:
            self._finished.pop(key, None)
        self._announce(key)
        return True

    async def actions(self, facade: str, request_id: str) -> list[ActionRecord]:
        """What operators did to the saga, oldest first."""
        return list(self._actions.get((facade, request_id), ()))

    async def add_dead_letter(self, letter: NewDeadLetter) -> bool:
        """Keep it WAITING; False when its id is kept already."""
        if letter.id in self._letters:
            return False
        self._letters[letter.id] = DeadLetterRecord(
            id=letter.id,
            topic=letter.topic,
            facade=letter.facade,
            request_id=letter.request_id,
            step=letter.step,
            message_id=letter.message_id,
            body=letter.body,
            headers=dict(letter.headers),
            reason=letter.reason,
            delivery_count=letter.delivery_count,
            dead_lettered_at=letter.dead_lettered_at,
        )
        return True

    async def get_dead_letter(self, letter_id: str) -> DeadLetterRecord | None:
        """The dead letter, or None."""
        return self._letters.get(letter_id)

    async def list_dead_letters(
        self,
        *,
        topic: str = "",
        facade: str = "",
        state: DeadLetterState = DeadLetterState.WAITING,
        page_size: int = 50,
        page_token: str = "",
    ) -> DeadLetterPage:
        """Newest first, a page at a time; a bad token raises ValueError."""
        page_size = max(1, min(page_size, MAX_PAGE_SIZE))
        matching = sorted(
            (
                letter
                for letter in self._letters.values()
                if letter.state == state
                and (not topic or letter.topic == topic)
                and (not facade or letter.facade == facade)
            ),
            key=_letter_position,
            reverse=True,
        )
        if page_token:
            after = _decode_letter(page_token)
            matching = [letter for letter in matching if _letter_position(letter) < after]
        page = matching[:page_size]
        token = _encode_letter(page[-1]) if len(matching) > page_size else ""
        return DeadLetterPage(letters=tuple(page), next_page_token=token)

    async def settle_dead_letter(
        self, letter_id: str, state: DeadLetterState, action: ActionRecord
    ) -> bool:
        """WAITING to `state`, once; the action goes on the saga's record if it exists."""
        if state == DeadLetterState.WAITING:
            raise ValueError("a dead letter is settled as REPLAYED or DISCARDED")
        letter = self._letters.get(letter_id)
        if letter is None or letter.state != DeadLetterState.WAITING:
            return False
        self._letters[letter_id] = dataclasses.replace(
            letter, state=state, settled_at=action.at, settled_by=action.actor, note=action.note
        )
        key = (letter.facade, letter.request_id)
        if key in self._sagas:
            self._actions.setdefault(key, []).append(action)
        return True

    async def unsettle_dead_letter(self, letter_id: str) -> bool:
        """REPLAYED back to WAITING, its replay action removed from the saga's record."""
        letter = self._letters.get(letter_id)
        if letter is None or letter.state != DeadLetterState.REPLAYED:
            return False
        self._letters[letter_id] = dataclasses.replace(
            letter, state=DeadLetterState.WAITING, settled_at=None, settled_by="", note=""
        )
        key = (letter.facade, letter.request_id)
        if key in self._actions:
            self._actions[key] = [
                action
                for action in self._actions[key]
                if not (action.action == "replay" and action.dead_letter_id == letter_id)
            ]
        return True


def operator_transition(
    saga: SagaRecord, change: OperatorChange, now: datetime
) -> SagaRecord | None:
    """`saga` after an operator's `change` at `now`, or None when it is not where the
    change expects it (the reference the SQL store's statements follow)."""
    if isinstance(change, Retried):
        current = saga.current_step
        if current is None or current.index != change.index:
            return None
        step = dataclasses.replace(
            current,
            state=StepState.RUNNING,
            attempts=current.attempts + 1,
            started_at=now,
            finished_at=None,
            error="",
            data=None,
        )
        return _with_steps(dataclasses.replace(saga, deadline_at=change.deadline_at), now, step)
    if isinstance(change, CompensationRetried):
        if saga.state != SagaState.COMPENSATION_FAILED:
            return None
        again = [
            dataclasses.replace(
                step,
                compensation=CompensationState.PENDING,
                compensated_at=None,
                compensation_error="",
            )
            for step in saga.steps
            if step.compensation == CompensationState.FAILED
        ]
        moved = dataclasses.replace(
            saga, state=SagaState.COMPENSATING, deadline_at=change.deadline_at
        )
        return _with_steps(moved, now, *again)
    if saga.state != change.expect:
        return None
    current = saga.current_step
    ended = (
        ()
        if current is None
        else (
            dataclasses.replace(
                current, state=StepState.FAILED, finished_at=now, error=change.reason
            ),
        )
    )
    return _with_steps(
        dataclasses.replace(saga, state=SagaState.RESOLVED, deadline_at=None), now, *ended
    )


def transition(saga: SagaRecord, change: Change, now: datetime) -> SagaRecord | None:
    """`saga` after `change` at `now`, or None when the saga is not where `change` expects it.

    The in-memory store applies changes with it; the SQL store's statements
    encode the same rules.
    """
    if isinstance(change, CompensationEnded):
        return _compensation_ended(saga, change, now)
    current = saga.current_step
    if current is None or current.index != change.index:
        return None
    if isinstance(change, StepRestarted):
        step = dataclasses.replace(
            current,
            state=StepState.RUNNING,
            attempts=current.attempts + 1,
            started_at=now,
            finished_at=None,
            error="",
            data=None,
        )
        return _with_steps(saga, now, step)
    if current.state != StepState.RUNNING and not isinstance(change, StepFailed):
        return None
    if isinstance(change, StepPending):
        return _with_steps(
            saga, now, dataclasses.replace(current, state=StepState.PENDING, error=change.reason)
        )
    if isinstance(change, StepEnded):
        ended = dataclasses.replace(
            current, state=StepState.DONE, finished_at=now, data=change.data
        )
        if change.complete:
            return _with_steps(
                dataclasses.replace(saga, state=SagaState.COMPLETED, deadline_at=None), now, ended
            )
        following = StepRecord(change.index + 1, change.next_step, StepState.RUNNING, 1, now)
        return _with_steps(saga, now, ended, following)
    failed = dataclasses.replace(
        current,
        state=StepState.FAILED,
        finished_at=now,
        error=change.reason,
        data=current.data if change.data is None else change.data,
    )
    marked = [
        dataclasses.replace(step, compensation=CompensationState.PENDING)
        for step in (*saga.steps[: current.index], failed)
        if step.index in change.undo
    ]
    moved = dataclasses.replace(
        saga,
        state=change.then,
        error_code=change.code,
        error_reason=change.reason,
        deadline_at=change.deadline_at if change.then == SagaState.COMPENSATING else None,
    )
    return _with_steps(moved, now, failed, *marked)


def _compensation_ended(
    saga: SagaRecord, change: CompensationEnded, now: datetime
) -> SagaRecord | None:
    if saga.state != SagaState.COMPENSATING:
        return None
    changed = [
        dataclasses.replace(step, compensation=CompensationState.DONE, compensated_at=now)
        for step in saga.steps
        if step.index in change.done
    ]
    failed = saga.step(change.failed) if change.failed is not None else None
    if failed is not None:
        changed.append(
            dataclasses.replace(
                failed,
                compensation=CompensationState.FAILED,
                compensated_at=now,
                compensation_error=change.error,
            )
        )
    moved = dataclasses.replace(saga, state=change.state, deadline_at=None)
    if change.state == SagaState.COMPENSATION_FAILED and change.error:
        moved = dataclasses.replace(moved, error_reason=change.error)
    return _with_steps(moved, now, *changed)


def _with_steps(saga: SagaRecord, now: datetime, *changed: StepRecord) -> SagaRecord:
    steps = {step.index: step for step in saga.steps}
    steps.update((step.index, step) for step in changed)
    ordered = tuple(steps[index] for index in sorted(steps))
    data = next((s.data for s in reversed(ordered) if s.data is not None), saga.data)
    return dataclasses.replace(saga, steps=ordered, data=data, updated_at=now)


def _matches(saga: SagaRecord, facade: str, request_id_prefix: str) -> bool:
    return (not facade or saga.facade == facade) and saga.request_id.startswith(request_id_prefix)


def _position(saga: SagaRecord) -> tuple[str, str, str]:
    return saga.created_at.isoformat(), saga.facade, saga.request_id


def _encode(saga: SagaRecord) -> str:
    raw = json.dumps(list(_position(saga))).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode(token: str) -> tuple[str, str, str]:
    try:
        created_at, facade, request_id = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError) as exc:
        raise ValueError("invalid page token") from exc
    return str(created_at), str(facade), str(request_id)


def _letter_position(letter: DeadLetterRecord) -> tuple[str, str]:
    return letter.dead_lettered_at.isoformat(), letter.id


def _encode_letter(letter: DeadLetterRecord) -> str:
    raw = json.dumps(list(_letter_position(letter))).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_letter(token: str) -> tuple[str, str]:
    try:
        at, letter_id = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError) as exc:
        raise ValueError("invalid page token") from exc
    return str(at), str(letter_id)
