"""The saga store's operator surface: operators' moves with their actions, and dead letters.

Each test runs on the three stores (`backend`, tests/support/store_backends.py):
`InMemorySagaStore`, whose `operator_transition` is the reference, and
`SqlSagaStore` on a SQLite file and on PostgreSQL. Where two replicas matter,
a second store on the same database reads back or races.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy.engine import make_url

from orchestrator.store import (
    MAX_PAGE_SIZE,
    ActionRecord,
    Change,
    CompensationEnded,
    CompensationRetried,
    CompensationState,
    DeadLetterState,
    NewDeadLetter,
    OperatorChange,
    Resolved,
    Retried,
    SagaRecord,
    SagaState,
    SagaStore,
    StepEnded,
    StepFailed,
    StepPending,
    StepRestarted,
    StepState,
)
from orchestrator.store.memory import operator_transition, transition
from tests.support.store_backends import (
    FACADE,
    Backend,
    act,
    action,
    apply,
    at_step,
    compensating,
    finished,
    get,
    later,
    shape,
)

pytestmark = pytest.mark.timeout(60)

RUNNING = SagaState.RUNNING
COMPENSATING = SagaState.COMPENSATING
COMPENSATED = SagaState.COMPENSATED
COMPENSATION_FAILED = SagaState.COMPENSATION_FAILED
RESOLVED = SagaState.RESOLVED
WAITING = DeadLetterState.WAITING
REPLAYED = DeadLetterState.REPLAYED
DISCARDED = DeadLetterState.DISCARDED


async def saga_in(store: SagaStore, request_id: str, state: SagaState) -> SagaRecord:
    """A saga of two steps in `state` (RUNNING: at its step 1)."""
    if state == RUNNING:
        return await at_step(store, request_id, 1)
    if state == COMPENSATING:
        return await compensating(store, request_id)
    if state == RESOLVED:
        await at_step(store, request_id, 1)
        assert await act(store, request_id, Resolved(RUNNING, "by hand"))
        return await get(store, request_id)
    return await finished(store, request_id, state)


def expected(before: SagaRecord, change: Change | OperatorChange) -> SagaRecord:
    """The record the reference says `change` leaves (it must apply)."""
    now = datetime.now(UTC)
    if isinstance(change, Retried | CompensationRetried | Resolved):
        moved = operator_transition(before, change, now)
    else:
        moved = transition(before, change, now)
    assert moved is not None, (before, change)
    return moved


def refused(before: SagaRecord, change: OperatorChange) -> bool:
    """Whether the reference refuses `change`."""
    return operator_transition(before, change, datetime.now(UTC)) is None


# --- Retried --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pending", [False, True], ids=["running", "pending"])
async def test_retried_runs_the_current_step_again_with_one_attempt_more_and_its_new_deadline(
    backend: Backend, pending: bool
) -> None:
    store = backend.store
    await at_step(store, "r1", 1)
    if pending:
        assert await apply(store, "r1", StepPending(1, "broker down"))
    before = await get(store, "r1")
    deadline = later(900)

    assert await act(store, "r1", Retried(1, deadline))

    saga = await get(store, "r1")
    assert shape(saga) == shape(expected(before, Retried(1, deadline)))
    step = saga.steps[1]
    assert (step.state, step.attempts, step.error) == (StepState.RUNNING, 2, "")
    assert (saga.state, saga.deadline_at) == (RUNNING, deadline)
    assert saga.updated_at > before.updated_at
    assert await get(await backend.another(), "r1") == saga


@pytest.mark.parametrize("index", [0, 2])
async def test_retried_of_a_step_that_is_not_current_is_refused(
    backend: Backend, index: int
) -> None:
    store = backend.store
    before = await at_step(store, "r1", 1)

    assert not await act(store, "r1", Retried(index, later(900)))

    assert await get(store, "r1") == before


@pytest.mark.parametrize("state", [COMPENSATING, COMPENSATED, COMPENSATION_FAILED, RESOLVED])
async def test_retried_is_refused_unless_the_saga_is_running(
    backend: Backend, state: SagaState
) -> None:
    store = backend.store
    before = await saga_in(store, "r1", state)

    for index in range(len(before.steps) + 1):
        assert refused(before, Retried(index, later(900)))
        assert not await act(store, "r1", Retried(index, later(900)))

    assert await get(store, "r1") == before


# --- CompensationRetried --------------------------------------------------------------------------


async def test_compensation_retried_compensates_again_the_step_whose_undoing_failed(
    backend: Backend,
) -> None:
    store = backend.store
    before = await saga_in(store, "r1", COMPENSATION_FAILED)  # step 1 undone, step 0 failed
    deadline = later(900)

    assert await act(store, "r1", CompensationRetried(deadline))

    saga = await get(store, "r1")
    assert shape(saga) == shape(expected(before, CompensationRetried(deadline)))
    assert (saga.state, saga.deadline_at) == (COMPENSATING, deadline)
    first, second = saga.steps
    assert (first.compensation, first.compensated_at, first.compensation_error) == (
        CompensationState.PENDING,
        None,
        "",
    )
    assert (second.compensation, second.compensated_at) == (
        CompensationState.DONE,
        before.steps[1].compensated_at,
    )
    assert await get(await backend.another(), "r1") == saga


async def test_a_saga_compensated_again_ends_as_its_compensation_says(backend: Backend) -> None:
    store = backend.store
    await saga_in(store, "r1", COMPENSATION_FAILED)
    assert await act(store, "r1", CompensationRetried(later(900)))

    assert await apply(store, "r1", CompensationEnded(COMPENSATED, done=(0,)))

    saga = await get(store, "r1")
    assert (saga.state, saga.deadline_at) == (COMPENSATED, None)
    assert [step.compensation for step in saga.steps] == [CompensationState.DONE] * 2


@pytest.mark.parametrize(
    "state", [RUNNING, COMPENSATING, SagaState.COMPLETED, COMPENSATED, RESOLVED]
)
async def test_compensation_retried_is_refused_unless_the_saga_is_compensation_failed(
    backend: Backend, state: SagaState
) -> None:
    store = backend.store
    before = await saga_in(store, "r1", state)
    assert refused(before, CompensationRetried(later(900)))

    assert not await act(store, "r1", CompensationRetried(later(900)))

    assert await get(store, "r1") == before


# --- Resolved -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pending", [False, True], ids=["running", "pending"])
async def test_resolved_ends_a_running_saga_resolved_with_its_current_step_failed(
    backend: Backend, pending: bool
) -> None:
    store = backend.store
    await at_step(store, "r1", 1)
    if pending:
        assert await apply(store, "r1", StepPending(1, "broker down"))
    before = await get(store, "r1")
    change = Resolved(RUNNING, "refunded by hand")

    assert await act(store, "r1", change)

    saga = await get(store, "r1")
    assert shape(saga) == shape(expected(before, change))
    assert (saga.state, saga.deadline_at, saga.error_code) == (RESOLVED, None, "")
    step = saga.steps[1]
    assert (step.state, step.error) == (StepState.FAILED, "refunded by hand")
    assert step.finished_at is not None
    assert saga.current_step is None
    assert await get(await backend.another(), "r1") == saga


@pytest.mark.parametrize("state", [COMPENSATING, COMPENSATION_FAILED])
async def test_resolved_ends_a_saga_that_compensates_or_failed_to_resolved_and_keeps_its_steps(
    backend: Backend, state: SagaState
) -> None:
    store = backend.store
    before = await saga_in(store, "r1", state)

    assert await act(store, "r1", Resolved(state, "settled with the hotel"))

    saga = await get(store, "r1")
    assert shape(saga) == shape(expected(before, Resolved(state, "settled with the hotel")))
    assert (saga.state, saga.deadline_at) == (RESOLVED, None)
    assert saga.steps == before.steps
    assert (saga.error_code, saga.error_reason) == (before.error_code, before.error_reason)


@pytest.mark.parametrize(
    ("state", "seen"),
    [
        (RUNNING, COMPENSATING),
        (RUNNING, COMPENSATION_FAILED),
        (COMPENSATING, RUNNING),
        (COMPENSATING, COMPENSATION_FAILED),
        (COMPENSATION_FAILED, RUNNING),
        (COMPENSATION_FAILED, COMPENSATING),
        (SagaState.COMPLETED, RUNNING),
        (COMPENSATED, COMPENSATING),
        (RESOLVED, RUNNING),
    ],
)
async def test_resolved_is_refused_unless_the_saga_is_where_the_operator_saw_it(
    backend: Backend, state: SagaState, seen: SagaState
) -> None:
    store = backend.store
    before = await saga_in(store, "r1", state)
    assert refused(before, Resolved(seen, "stale"))

    assert not await act(store, "r1", Resolved(seen, "stale"))

    assert await get(store, "r1") == before


@pytest.mark.parametrize("state", [SagaState.COMPLETED, COMPENSATED, RESOLVED])
def test_a_resolution_of_a_saga_seen_finished_cannot_be_made(state: SagaState) -> None:
    with pytest.raises(ValueError, match="cannot be resolved"):
        Resolved(state, "too late")


async def test_a_resolved_saga_refuses_every_change_of_the_engine_and_of_operators(
    backend: Backend,
) -> None:
    store = backend.store
    before = await saga_in(store, "r1", RESOLVED)
    engine: list[Change] = [
        StepRestarted(1),
        StepPending(1, "x"),
        StepEnded(1, "{}", complete=True),
        StepFailed(1, "ABORTED", "x", then=COMPENSATED),
        CompensationEnded(COMPENSATED, done=(0,)),
    ]
    operators: list[OperatorChange] = [
        Retried(1, later()),
        CompensationRetried(later()),
        *(Resolved(state, "again") for state in (RUNNING, COMPENSATING, COMPENSATION_FAILED)),
    ]

    for change in engine:
        assert not await apply(store, "r1", change), change
        assert not await act(store, "r1", change), change
    for operator in operators:
        assert not await act(store, "r1", operator), operator

    assert await get(store, "r1") == before
    assert len(await store.actions(FACADE, "r1")) == 1  # the resolution's


# --- the engine's changes through act -------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        StepFailed(1, "CANCELLED", "stopped by an operator", undo=(0,), deadline_at=later()),
        StepFailed(1, "CANCELLED", "stopped by an operator", then=COMPENSATED),
        StepRestarted(1),
        StepEnded(1, '{"by": "hand"}', complete=True),
    ],
    ids=["failed", "failed-at-once", "restarted", "ended"],
)
async def test_an_engine_change_through_act_does_what_apply_does(
    backend: Backend, change: Change
) -> None:
    store = backend.store
    deadline = later()
    await at_step(store, "via-act", 1, deadline_at=deadline)
    await at_step(store, "via-apply", 1, deadline_at=deadline)
    before = await get(store, "via-act")

    assert await act(store, "via-act", change)
    assert await apply(store, "via-apply", change)

    by_act, by_apply = await get(store, "via-act"), await get(store, "via-apply")
    assert shape(by_act)[2:] == shape(by_apply)[2:] == shape(expected(before, change))[2:]
    assert len(await store.actions(FACADE, "via-act")) == 1
    assert await store.actions(FACADE, "via-apply") == []


@pytest.mark.parametrize("state", [SagaState.COMPLETED, COMPENSATED, COMPENSATION_FAILED])
async def test_an_engine_change_through_act_is_refused_where_apply_refuses_it(
    backend: Backend, state: SagaState
) -> None:
    store = backend.store
    before = await saga_in(store, "r1", state)

    for change in (
        StepFailed(0, "CANCELLED", "x", then=COMPENSATED),
        StepRestarted(1),
        CompensationEnded(COMPENSATED, done=(0, 1)),
    ):
        assert not await act(store, "r1", change), change

    assert await get(store, "r1") == before
    assert await store.actions(FACADE, "r1") == []


# --- actions --------------------------------------------------------------------------------------


async def test_each_applied_act_records_its_action_oldest_first(backend: Backend) -> None:
    store = backend.store
    await at_step(store, "r1", 1)
    retry = ActionRecord("retry", "alice@example.com", "the hotel is back", later(-60))
    resolve = ActionRecord("resolve", "bob@example.com", "", later(-30))

    assert await act(store, "r1", Retried(1, later()), retry)
    assert await act(store, "r1", Resolved(RUNNING, "refunded"), resolve)

    assert await store.actions(FACADE, "r1") == [retry, resolve]
    assert await (await backend.another()).actions(FACADE, "r1") == [retry, resolve]


async def test_a_refused_act_records_no_action(backend: Backend) -> None:
    store = backend.store
    await at_step(store, "r1", 1)
    assert await act(store, "r1", Resolved(RUNNING, "first"))

    assert not await act(store, "r1", Resolved(RUNNING, "second"), action(note="second"))
    assert not await act(store, "r1", CompensationRetried(later()), action("compensate"))

    assert [done.note for done in await store.actions(FACADE, "r1")] == ["resolve by hand"]


@pytest.mark.parametrize(
    "change",
    [Retried(0, later()), CompensationRetried(later()), Resolved(RUNNING, "x"), StepRestarted(0)],
    ids=lambda change: type(change).__name__,
)
async def test_an_act_on_a_saga_never_begun_is_refused_and_records_nothing(
    backend: Backend, change: Change | OperatorChange
) -> None:
    store = backend.store
    await at_step(store, "r1", 0, facade="other")  # the same request id, another facade

    assert not await store.act(FACADE, "r1", change, action())
    assert not await store.act("other", "missing", change, action())

    assert await store.get(FACADE, "r1") is None
    assert await store.actions(FACADE, "r1") == []
    assert await store.actions("other", "r1") == []


async def test_an_act_whose_action_cannot_be_written_moves_nothing(backend: Backend) -> None:
    if backend.name == "memory":
        pytest.skip("one write that cannot half fail")
    store = backend.store
    before = await at_step(store, "r1", 1)
    await _drop_actions_table(backend.url)

    with pytest.raises(Exception, match="saga_actions"):
        await store.act(FACADE, "r1", Resolved(RUNNING, "x"), action())

    assert await get(store, "r1") == before
    assert await get(await backend.another(), "r1") == before


async def _drop_actions_table(url: str) -> None:
    """Sabotage: the actions' table gone behind the store's back."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        conn = sqlite3.connect(parsed.database or "", timeout=5)
        try:
            conn.execute("DROP TABLE saga_actions")
            conn.commit()
        finally:
            conn.close()
        return
    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    pg = await asyncpg.connect(dsn, timeout=5)
    try:
        await pg.execute("DROP TABLE saga_actions")
    finally:
        await pg.close()


RACES: dict[str, tuple[SagaState, Callable[[int], Change | OperatorChange]]] = {
    # The state the saga is in, and the n-th racer's move.
    "resolve": (RUNNING, lambda n: Resolved(RUNNING, f"by {n}")),
    "resolve-or-fail": (
        RUNNING,
        lambda n: (
            Resolved(RUNNING, f"by {n}")
            if n % 2
            else StepFailed(1, "CANCELLED", f"by {n}", then=COMPENSATED)
        ),
    ),
    "compensate-again": (COMPENSATION_FAILED, lambda n: CompensationRetried(later(600 + n))),
    "compensate-again-or-resolve": (
        COMPENSATION_FAILED,
        lambda n: (
            CompensationRetried(later(600 + n))
            if n % 2
            else Resolved(COMPENSATION_FAILED, f"by {n}")
        ),
    ),
}


@pytest.mark.parametrize("replicas", [1, 2], ids=["one-store", "two-stores"])
@pytest.mark.parametrize("race", list(RACES))
async def test_concurrent_acts_on_one_saga_apply_once_with_one_action(
    backend: Backend, race: str, replicas: int
) -> None:
    stores = [backend.store, await backend.another()][:replicas]
    state, racer = RACES[race]
    start = await saga_in(stores[0], "r1", state)
    moves = [racer(n) for n in range(30)]
    actions = [action(note=f"racer {n}") for n in range(30)]

    applied = await asyncio.gather(
        *(stores[n % replicas].act(FACADE, "r1", move, actions[n]) for n, move in enumerate(moves))
    )

    assert applied.count(True) == 1, applied
    winner = applied.index(True)
    saga = await get(stores[0], "r1")
    assert shape(saga) == shape(expected(start, moves[winner]))
    assert await get(stores[-1], "r1") == saga
    assert await stores[-1].actions(FACADE, "r1") == [actions[winner]]


async def test_acts_from_two_store_instances_number_their_actions_in_turn(
    backend: Backend,
) -> None:
    # Retried may be applied again and again: each one applied is recorded, none lost to
    # another replica's at the same moment.
    stores = [backend.store, await backend.another()]
    await at_step(stores[0], "r1", 1)
    actions = [action("retry", note=f"retry {n}") for n in range(20)]

    applied = await asyncio.gather(
        *(
            stores[n % 2].act(FACADE, "r1", Retried(1, later()), done)
            for n, done in enumerate(actions)
        )
    )

    assert all(applied)
    recorded = await stores[1].actions(FACADE, "r1")
    assert sorted(recorded, key=lambda done: done.note) == sorted(actions, key=lambda d: d.note)
    assert (await get(stores[0], "r1")).steps[1].attempts == 21


# --- dead letters ---------------------------------------------------------------------------------

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def letter(
    letter_id: str,
    *,
    topic: str = "booking.hotel",
    facade: str = FACADE,
    request_id: str = "r1",
    at: datetime = T0,
) -> NewDeadLetter:
    return NewDeadLetter(
        id=letter_id,
        topic=topic,
        facade=facade,
        request_id=request_id,
        step="hotel",
        message_id=f"msg-{letter_id}",
        body=b"\x00\xff binary \xc3(",
        headers={"traceparent": "00-abc-def-01", "x-death-reason": "rejected"},
        reason="delivered 5 times",
        delivery_count=5,
        dead_lettered_at=at,
    )


def settling(name: str, letter_id: str, note: str = "") -> ActionRecord:
    return ActionRecord(name, "ops@example.com", note or f"{name} it", later(-1), letter_id)


async def test_a_dead_letter_is_kept_waiting_as_it_came(backend: Backend) -> None:
    store = backend.store
    new = letter("dl-1")

    assert await store.add_dead_letter(new)

    kept = await store.get_dead_letter("dl-1")
    assert kept is not None
    assert dataclasses.asdict(kept) == {
        **dataclasses.asdict(new),
        "headers": dict(new.headers),
        "state": WAITING,
        "settled_at": None,
        "settled_by": "",
        "note": "",
    }
    assert type(kept.body) is bytes
    assert await (await backend.another()).get_dead_letter("dl-1") == kept


async def test_a_dead_letter_is_kept_once_per_id(backend: Backend) -> None:
    store = backend.store
    assert await store.add_dead_letter(letter("dl-1"))
    first = await store.get_dead_letter("dl-1")

    again = dataclasses.replace(letter("dl-1", topic="other"), reason="again", delivery_count=9)
    assert not await store.add_dead_letter(again)

    assert await store.get_dead_letter("dl-1") == first


async def test_concurrent_adds_of_one_dead_letter_keep_it_once(backend: Backend) -> None:
    stores = [backend.store, await backend.another()]

    added = await asyncio.gather(
        *(stores[n % 2].add_dead_letter(letter("dl-1", topic=f"t{n}")) for n in range(10))
    )

    assert added.count(True) == 1, added
    kept = await stores[1].get_dead_letter("dl-1")
    assert kept is not None and kept.topic == f"t{added.index(True)}"


async def test_an_unknown_dead_letter_is_none(backend: Backend) -> None:
    assert await backend.store.get_dead_letter("nope") is None


async def test_dead_letters_are_listed_newest_first_a_page_at_a_time(backend: Backend) -> None:
    store = backend.store
    # Two at each moment: among those the id orders them.
    ids = [f"dl-{n:02d}" for n in range(11)]
    await asyncio.gather(
        *(
            store.add_dead_letter(letter(letter_id, at=T0 + timedelta(seconds=n // 2)))
            for n, letter_id in enumerate(ids)
        )
    )

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await store.list_dead_letters(page_size=4, page_token=token)
        assert len(page.letters) <= 4
        seen += [kept.id for kept in page.letters]
        pages += 1
        token = page.next_page_token
        if not token:
            break

    assert seen == sorted(ids, reverse=True)
    assert pages == 3


async def test_dead_letters_are_listed_by_state_topic_and_facade(backend: Backend) -> None:
    store = backend.store
    letters = [
        letter("a", topic="t1", facade="f1"),
        letter("b", topic="t1", facade="f2", at=T0 + timedelta(seconds=1)),
        letter("c", topic="t2", facade="f1", at=T0 + timedelta(seconds=2)),
        letter("d", topic="t2", facade="f2", at=T0 + timedelta(seconds=3)),
    ]
    for new in letters:
        assert await store.add_dead_letter(new)
    assert await store.settle_dead_letter("d", DISCARDED, settling("discard", "d"))

    async def listed(**filters: object) -> list[str]:
        page = await store.list_dead_letters(**filters)  # type: ignore[arg-type]
        return [kept.id for kept in page.letters]

    assert await listed() == ["c", "b", "a"]
    assert await listed(topic="t1") == ["b", "a"]
    assert await listed(facade="f1") == ["c", "a"]
    assert await listed(topic="t2", facade="f1") == ["c"]
    assert await listed(state=DISCARDED) == ["d"]
    assert await listed(state=REPLAYED) == []
    assert await listed(topic="t3") == []


async def test_a_page_size_is_cut_to_one_to_max_page_size(backend: Backend) -> None:
    store = backend.store
    await asyncio.gather(
        *(
            store.add_dead_letter(letter(f"dl-{n:03d}", at=T0 + timedelta(microseconds=n)))
            for n in range(MAX_PAGE_SIZE + 1)
        )
    )

    smallest = await store.list_dead_letters(page_size=0)
    largest = await store.list_dead_letters(page_size=MAX_PAGE_SIZE * 10)
    rest = await store.list_dead_letters(
        page_size=MAX_PAGE_SIZE, page_token=largest.next_page_token
    )

    assert [kept.id for kept in smallest.letters] == [f"dl-{MAX_PAGE_SIZE:03d}"]
    assert smallest.next_page_token
    assert len(largest.letters) == MAX_PAGE_SIZE
    assert [kept.id for kept in rest.letters] == ["dl-000"]
    assert rest.next_page_token == ""


def _token(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


NOT_A_MOMENT = [_token(["yesterday", "dl-1"]), _token(["2026-11-30T12:00:00", "dl-1"])]


@pytest.mark.parametrize(
    "token",
    [
        "not a token",
        "%%%",
        _token(["2026-11-30T12:00:00+00:00"]),
        _token(["2026-11-30T12:00:00+00:00", "dl-1", "extra"]),
        _token({"at": 1}),
        _token(7),
        *NOT_A_MOMENT,
    ],
)
async def test_a_dead_letter_page_token_the_store_did_not_issue_is_a_value_error(
    backend: Backend, token: str
) -> None:
    if backend.name == "memory" and token in NOT_A_MOMENT:
        pytest.skip("the in-memory store compares a token's moment as text, unparsed")
    await backend.store.add_dead_letter(letter("dl-1"))

    with pytest.raises(ValueError, match="page token"):
        await backend.store.list_dead_letters(page_token=token)


# --- settling dead letters ------------------------------------------------------------------------


@pytest.mark.parametrize("state", [REPLAYED, DISCARDED])
async def test_settling_a_waiting_dead_letter_moves_it_once(
    backend: Backend, state: DeadLetterState
) -> None:
    store = backend.store
    assert await store.add_dead_letter(letter("dl-1"))
    done = settling("replay" if state == REPLAYED else "discard", "dl-1", "fixed the hotel")

    assert await store.settle_dead_letter("dl-1", state, done)
    for again in (REPLAYED, DISCARDED):
        assert not await store.settle_dead_letter("dl-1", again, settling("discard", "dl-1"))

    kept = await (await backend.another()).get_dead_letter("dl-1")
    assert kept is not None
    assert (kept.state, kept.settled_at, kept.settled_by, kept.note) == (
        state,
        done.at,
        "ops@example.com",
        "fixed the hotel",
    )
    assert [k.id for k in (await store.list_dead_letters(state=state)).letters] == ["dl-1"]
    assert (await store.list_dead_letters()).letters == ()


async def test_settling_records_the_action_on_the_sagas_record(backend: Backend) -> None:
    store = backend.store
    await at_step(store, "r1", 1)
    assert await act(store, "r1", Retried(1, later()), action("retry"))
    assert await store.add_dead_letter(letter("dl-1", request_id="r1"))
    replay = settling("replay", "dl-1")

    assert await store.settle_dead_letter("dl-1", REPLAYED, replay)

    recorded = await (await backend.another()).actions(FACADE, "r1")
    assert [done.action for done in recorded] == ["retry", "replay"]
    assert recorded[1] == replay


async def test_settling_a_dead_letter_of_no_known_saga_records_no_action(
    backend: Backend,
) -> None:
    store = backend.store
    assert await store.add_dead_letter(letter("dl-1", facade="", request_id=""))
    assert await store.add_dead_letter(letter("dl-2", request_id="never-begun"))

    assert await store.settle_dead_letter("dl-1", DISCARDED, settling("discard", "dl-1"))
    assert await store.settle_dead_letter("dl-2", DISCARDED, settling("discard", "dl-2"))

    assert await store.actions("", "") == []
    assert await store.actions(FACADE, "never-begun") == []
    kept = await store.get_dead_letter("dl-2")
    assert kept is not None and kept.state == DISCARDED


async def test_an_unknown_dead_letter_is_not_settled(backend: Backend) -> None:
    assert not await backend.store.settle_dead_letter("nope", REPLAYED, settling("replay", "nope"))
    assert await backend.store.get_dead_letter("nope") is None


async def test_settling_as_waiting_is_a_value_error(backend: Backend) -> None:
    await backend.store.add_dead_letter(letter("dl-1"))

    with pytest.raises(ValueError):
        await backend.store.settle_dead_letter("dl-1", WAITING, settling("replay", "dl-1"))


@pytest.mark.parametrize("replicas", [1, 2], ids=["one-store", "two-stores"])
async def test_a_replay_and_a_discard_racing_settle_the_dead_letter_once(
    backend: Backend, replicas: int
) -> None:
    stores = [backend.store, await backend.another()][:replicas]
    await at_step(stores[0], "r1", 1)
    assert await stores[0].add_dead_letter(letter("dl-1", request_id="r1"))
    racers = [
        (REPLAYED, settling("replay", "dl-1", f"racer {n}"))
        if n % 2
        else (DISCARDED, settling("discard", "dl-1", f"racer {n}"))
        for n in range(20)
    ]

    settled = await asyncio.gather(
        *(
            stores[n % replicas].settle_dead_letter("dl-1", state, done)
            for n, (state, done) in enumerate(racers)
        )
    )

    assert settled.count(True) == 1, settled
    state, done = racers[settled.index(True)]
    kept = await stores[-1].get_dead_letter("dl-1")
    assert kept is not None and (kept.state, kept.note) == (state, done.note)
    assert await stores[-1].actions(FACADE, "r1") == [done]


# --- unsettling -----------------------------------------------------------------------------------


async def test_unsettling_a_replayed_dead_letter_makes_it_waiting_without_its_replay_action(
    backend: Backend,
) -> None:
    store = backend.store
    await at_step(store, "r1", 1)
    retry = action("retry")
    assert await act(store, "r1", Retried(1, later()), retry)
    new = letter("dl-1", request_id="r1")
    assert await store.add_dead_letter(new)
    waiting = await store.get_dead_letter("dl-1")
    assert await store.settle_dead_letter("dl-1", REPLAYED, settling("replay", "dl-1"))

    assert await store.unsettle_dead_letter("dl-1")

    assert await (await backend.another()).get_dead_letter("dl-1") == waiting
    assert await store.actions(FACADE, "r1") == [retry]
    assert [kept.id for kept in (await store.list_dead_letters()).letters] == ["dl-1"]


async def test_an_unsettled_dead_letter_is_settled_again_once(backend: Backend) -> None:
    store = backend.store
    await at_step(store, "r1", 1)
    assert await store.add_dead_letter(letter("dl-1", request_id="r1"))
    assert await store.settle_dead_letter("dl-1", REPLAYED, settling("replay", "dl-1"))
    assert await store.unsettle_dead_letter("dl-1")
    discard = settling("discard", "dl-1", "gave up")

    assert await store.settle_dead_letter("dl-1", DISCARDED, discard)
    assert not await store.unsettle_dead_letter("dl-1")

    kept = await store.get_dead_letter("dl-1")
    assert kept is not None and (kept.state, kept.note) == (DISCARDED, "gave up")
    assert await store.actions(FACADE, "r1") == [discard]


@pytest.mark.parametrize("state", [WAITING, DISCARDED])
async def test_only_a_replayed_dead_letter_is_unsettled(
    backend: Backend, state: DeadLetterState
) -> None:
    store = backend.store
    await at_step(store, "r1", 1)
    assert await store.add_dead_letter(letter("dl-1", request_id="r1"))
    if state == DISCARDED:
        assert await store.settle_dead_letter("dl-1", DISCARDED, settling("discard", "dl-1"))
    before = await store.get_dead_letter("dl-1")
    recorded = await store.actions(FACADE, "r1")

    assert not await store.unsettle_dead_letter("dl-1")
    assert not await store.unsettle_dead_letter("nope")

    assert await store.get_dead_letter("dl-1") == before
    assert await store.actions(FACADE, "r1") == recorded
