"""The saga store's journal: what each change does, and refuses, on every store.

Each test runs on the three stores (`backend`, from tests/support/store_backends.py,
with the helpers that build sagas): `InMemorySagaStore`, and
`SqlSagaStore` on a SQLite file and on PostgreSQL (a database per module on
`$ORCH_TEST_POSTGRES_URL`'s server, default postgres@127.0.0.1:5432, skipped
when unreachable unless `$CI` is set; see tests/support/databases.py). Tests
judge the store by what it returns, and, where two replicas matter, by what a
second store on the same database reads back. Every change goes through
`apply`, which checks the journal's invariant on the record after it.

The SQL store's writers, batching, paging and migrations are in
tests/test_store_sql.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchestrator.store import (
    CLAIM_BATCH,
    RESOLVABLE,
    Change,
    CompensationEnded,
    CompensationRetried,
    CompensationState,
    NewSaga,
    OperatorChange,
    Position,
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
    check_journal,
    compensating,
    data,
    finished,
    get,
    later,
    new_saga,
    shape,
)

pytestmark = pytest.mark.timeout(60)

COMPENSATING = SagaState.COMPENSATING
COMPENSATED = SagaState.COMPENSATED
COMPENSATION_FAILED = SagaState.COMPENSATION_FAILED


# --- the stores ---------------------------------------------------------------------------------


@pytest.fixture
def store(backend: Backend) -> SagaStore:
    """The backend's first store."""
    return backend.store


# --- sagas, changes and the invariant -------------------------------------------------------------


@pytest.mark.parametrize("name", ["facade", "request_id"])
def test_a_saga_key_longer_than_128_characters_is_refused_whatever_the_store(name: str) -> None:
    fields = {"facade": "F", "request_id": "r", name: "x" * 129}

    with pytest.raises(ValueError, match=f"a saga's {name} is 1 to 128 characters"):
        NewSaga(
            facade=fields["facade"],
            request_id=fields["request_id"],
            kind="sync",
            payload="{}",
            payload_hash="h",
            owner="me",
            first_step="a",
            deadline_at=None,
        )


def every_change(index: int) -> list[Change]:
    """One change of each kind (and each way out) naming step `index`."""
    return [
        StepRestarted(index),
        StepPending(index, "broker down"),
        StepEnded(index, '{"late": true}', next_step="late"),
        StepEnded(index, '{"late": true}', complete=True),
        StepFailed(index, "ABORTED", "late", undo=(index,), deadline_at=later()),
        StepFailed(index, "ABORTED", "late", then=COMPENSATED),
        CompensationEnded(COMPENSATED, done=(index,)),
        CompensationEnded(COMPENSATION_FAILED, failed=index, error="late"),
    ]


# --- begin ----------------------------------------------------------------------------------------


async def test_begin_records_a_running_saga_at_its_first_step(store: SagaStore) -> None:
    deadline = later(60)
    assert await store.begin(new_saga("r1", kind="async", deadline_at=deadline)) is None

    saga = await get(store, "r1")
    check_journal(saga)
    assert (saga.facade, saga.request_id, saga.kind, saga.state) == (
        FACADE,
        "r1",
        "async",
        SagaState.RUNNING,
    )
    assert (saga.payload, saga.payload_hash, saga.owner, saga.data) == (
        '{"hotel": "h1"}',
        'hash-{"hotel": "h1"}',
        "replica-a",
        "",
    )
    assert (saga.deadline_at, saga.error_code, saga.error_reason) == (deadline, "", "")
    (step,) = saga.steps
    assert (step.index, step.name, step.state, step.attempts) == (0, "step-0", StepState.RUNNING, 1)
    assert (step.finished_at, step.data, step.compensation) == (None, None, CompensationState.NONE)
    assert saga.created_at.tzinfo == UTC
    assert saga.created_at <= saga.updated_at


async def test_begin_again_returns_the_existing_record_and_changes_nothing(
    store: SagaStore,
) -> None:
    await at_step(store, "r1", 1)
    before = await get(store, "r1")

    again = await store.begin(
        new_saga("r1", kind="async", owner="replica-b", payload='{"hotel": "other"}')
    )

    assert again == before
    assert await get(store, "r1") == before


async def test_concurrent_begins_from_two_store_instances_create_each_saga_once(
    backend: Backend,
) -> None:
    stores = [backend.store, await backend.another()]
    ids = [f"race-{i}" for i in range(20)]

    results = await asyncio.gather(
        *(store.begin(new_saga(request_id)) for request_id in ids for store in stores)
    )

    for request_id, pair in zip(ids, zip(results[::2], results[1::2], strict=True), strict=True):
        created = [result for result in pair if result is None]
        existing = [result for result in pair if result is not None]
        assert len(created) == 1 and len(existing) == 1, (request_id, pair)
        # The loser got the winner's saga, as both stores read it now.
        assert existing[0] == await get(stores[0], request_id) == await get(stores[1], request_id)


# --- each change applies only where the saga stands -----------------------------------------------


async def test_step_ended_starts_the_next_step_with_the_steps_data(store: SagaStore) -> None:
    await at_step(store, "r1", 0)

    assert await apply(store, "r1", StepEnded(0, data(0), next_step="step-1"))

    saga = await get(store, "r1")
    assert saga.state == SagaState.RUNNING
    first, second = saga.steps
    assert (first.state, first.data) == (StepState.DONE, data(0))
    assert first.finished_at is not None and first.finished_at >= first.started_at
    assert (second.index, second.name, second.state, second.attempts) == (
        1,
        "step-1",
        StepState.RUNNING,
        1,
    )
    assert saga.data == data(0)


async def test_step_ended_with_complete_completes_the_saga(store: SagaStore) -> None:
    await at_step(store, "r1", 1)

    assert await apply(store, "r1", StepEnded(1, data(1), complete=True))

    saga = await get(store, "r1")
    assert (saga.state, saga.data, saga.deadline_at) == (SagaState.COMPLETED, data(1), None)
    assert saga.completed_steps == ["step-0", "step-1"]
    assert saga.finished


@pytest.mark.parametrize("index", [0, 2, -1])
async def test_step_ended_of_a_step_that_is_not_current_is_refused(
    store: SagaStore, index: int
) -> None:
    before = await at_step(store, "r1", 1)

    assert not await apply(store, "r1", StepEnded(index, data(index), next_step="other"))
    assert not await apply(store, "r1", StepEnded(index, data(index), complete=True))

    assert await get(store, "r1") == before


async def test_a_second_step_ended_of_the_same_step_is_refused(store: SagaStore) -> None:
    await at_step(store, "r1", 0)
    assert await apply(store, "r1", StepEnded(0, data(0), next_step="step-1"))
    after_first = await get(store, "r1")

    assert not await apply(store, "r1", StepEnded(0, '{"again": 1}', next_step="step-1"))
    assert not await apply(store, "r1", StepEnded(0, '{"again": 1}', complete=True))

    assert await get(store, "r1") == after_first


async def test_step_restarted_counts_the_attempts_of_the_current_step(store: SagaStore) -> None:
    await at_step(store, "r1", 1)

    assert await apply(store, "r1", StepRestarted(1))
    assert await apply(store, "r1", StepRestarted(1))
    assert not await apply(store, "r1", StepRestarted(0))  # done: not current
    assert not await apply(store, "r1", StepRestarted(2))  # never started

    saga = await get(store, "r1")
    assert [(step.state, step.attempts) for step in saga.steps] == [
        (StepState.DONE, 1),
        (StepState.RUNNING, 3),
    ]
    assert (saga.steps[1].finished_at, saga.steps[1].error) == (None, "")


async def test_step_pending_then_step_restarted_runs_the_step_again(store: SagaStore) -> None:
    await at_step(store, "r1", 0)

    assert await apply(store, "r1", StepPending(0, "broker down"))
    pending = await get(store, "r1")
    assert await apply(store, "r1", StepRestarted(0))

    assert pending.state == SagaState.RUNNING
    assert pending.current_step is not None
    assert (pending.current_step.state, pending.current_step.error) == (
        StepState.PENDING,
        "broker down",
    )
    (step,) = (await get(store, "r1")).steps
    assert (step.state, step.attempts, step.error) == (StepState.RUNNING, 2, "")


async def test_a_pending_step_neither_ends_nor_goes_pending_again(store: SagaStore) -> None:
    await at_step(store, "r1", 0)
    assert await apply(store, "r1", StepPending(0, "broker down"))
    pending = await get(store, "r1")

    assert not await apply(store, "r1", StepPending(0, "still down"))
    assert not await apply(store, "r1", StepEnded(0, data(0), next_step="step-1"))
    assert not await apply(store, "r1", StepEnded(0, data(0), complete=True))

    assert await get(store, "r1") == pending


@pytest.mark.parametrize("from_state", [StepState.RUNNING, StepState.PENDING])
async def test_step_failed_rolls_back_a_running_or_pending_step(
    store: SagaStore, from_state: StepState
) -> None:
    await at_step(store, "r1", 1)
    if from_state == StepState.PENDING:
        assert await apply(store, "r1", StepPending(1, "broker down"))
    deadline = later(120)

    failed = StepFailed(1, "UNAVAILABLE", "payment down", undo=(0,), deadline_at=deadline)
    assert await apply(store, "r1", failed)

    saga = await get(store, "r1")
    assert (saga.state, saga.error_code, saga.error_reason, saga.deadline_at) == (
        COMPENSATING,
        "UNAVAILABLE",
        "payment down",
        deadline,
    )
    step = saga.steps[1]
    assert (step.state, step.error) == (StepState.FAILED, "payment down")
    assert step.finished_at is not None
    assert saga.failed_step == step
    assert saga.data == data(0)  # no data given: the last finished step's


async def test_step_failed_of_a_step_that_is_not_current_is_refused(store: SagaStore) -> None:
    before = await at_step(store, "r1", 1)

    for index in (0, 2):
        failed = StepFailed(index, "ABORTED", "stale", undo=(0,), deadline_at=later())
        assert not await apply(store, "r1", failed)

    assert await get(store, "r1") == before


@pytest.mark.parametrize(
    ("undo", "then"),
    [((0, 2, 3), COMPENSATING), ((3,), COMPENSATING), ((), COMPENSATED)],
    ids=["some-steps", "the-failed-step", "nothing"],
)
async def test_step_failed_marks_exactly_the_undo_steps_and_moves_to_then(
    store: SagaStore, undo: tuple[int, ...], then: SagaState
) -> None:
    await at_step(store, "r1", 3)
    deadline = later(120) if then == COMPENSATING else None

    change = StepFailed(3, "ABORTED", "stopped", undo=undo, deadline_at=deadline, then=then)
    assert await apply(store, "r1", change)

    saga = await get(store, "r1")
    assert (saga.state, saga.deadline_at) == (then, deadline)
    assert [step.compensation for step in saga.steps] == [
        CompensationState.PENDING if step.index in undo else CompensationState.NONE
        for step in saga.steps
    ]
    assert [step.state for step in saga.steps] == [StepState.DONE] * 3 + [StepState.FAILED]


async def test_step_failed_with_data_makes_it_the_sagas_data(store: SagaStore) -> None:
    await at_step(store, "r1", 1)

    failed = StepFailed(1, "ABORTED", "stopped", undo=(0, 1), deadline_at=later(), data='{"x": 1}')
    assert await apply(store, "r1", failed)

    saga = await get(store, "r1")
    assert (saga.data, saga.steps[1].data) == ('{"x": 1}', '{"x": 1}')


async def test_compensation_ended_is_refused_unless_the_saga_is_compensating(
    store: SagaStore,
) -> None:
    before = await at_step(store, "r1", 1)

    assert not await apply(store, "r1", CompensationEnded(COMPENSATED, done=(0,)))
    ended = CompensationEnded(COMPENSATION_FAILED, failed=0, error="x")
    assert not await apply(store, "r1", ended)

    assert await get(store, "r1") == before


async def test_compensation_ended_records_the_steps_undone(store: SagaStore) -> None:
    await compensating(store, "r1")

    assert await apply(store, "r1", CompensationEnded(COMPENSATED, done=(0, 1)))

    saga = await get(store, "r1")
    assert (saga.state, saga.deadline_at) == (COMPENSATED, None)
    assert (saga.error_code, saga.error_reason) == ("FAILED_PRECONDITION", "declined")
    for step in saga.steps:
        assert (step.compensation, step.compensation_error) == (CompensationState.DONE, "")
        assert step.compensated_at is not None


async def test_compensation_ended_failed_records_the_step_and_its_error(store: SagaStore) -> None:
    await compensating(store, "r1")

    ended = CompensationEnded(COMPENSATION_FAILED, done=(1,), failed=0, error="cancel failed")
    assert await apply(store, "r1", ended)

    saga = await get(store, "r1")
    assert (saga.state, saga.deadline_at) == (COMPENSATION_FAILED, None)
    assert (saga.error_code, saga.error_reason) == ("FAILED_PRECONDITION", "cancel failed")
    first, second = saga.steps
    assert (first.compensation, first.compensation_error) == (
        CompensationState.FAILED,
        "cancel failed",
    )
    assert (second.compensation, second.compensation_error) == (CompensationState.DONE, "")
    assert first.compensated_at is not None and second.compensated_at is not None


@pytest.mark.parametrize("state", [SagaState.COMPLETED, COMPENSATED, COMPENSATION_FAILED])
async def test_a_finished_saga_refuses_every_change_and_stays_as_it_was(
    backend: Backend, state: SagaState
) -> None:
    store = backend.store
    before = await finished(store, "r1", state)

    for index in range(len(before.steps) + 1):
        for change in every_change(index):
            assert not await apply(store, "r1", change), change

    assert await get(store, "r1") == before
    assert await get(await backend.another(), "r1") == before


@pytest.mark.parametrize("change", every_change(0), ids=lambda change: type(change).__name__)
async def test_a_change_to_an_unknown_saga_is_refused(store: SagaStore, change: Change) -> None:
    await at_step(store, "r1", 0, facade="other")

    assert await store.apply(FACADE, "r1", change) is False
    assert await store.apply("other", "missing", change) is False

    assert await store.get(FACADE, "r1") is None
    assert await store.get("other", "missing") is None


async def test_one_request_id_under_two_facades_is_two_independent_sagas(
    store: SagaStore,
) -> None:
    assert await store.begin(new_saga("shared", facade="sync-booking")) is None
    assert await store.begin(new_saga("shared", facade="async-booking", kind="async")) is None
    untouched = await get(store, "shared", facade="async-booking")

    assert await apply(store, "shared", StepEnded(0, data(0), complete=True), facade="sync-booking")
    failed = StepFailed(0, "ABORTED", "no", then=COMPENSATED)
    assert not await apply(store, "shared", failed, facade="sync-booking")

    assert (await get(store, "shared", facade="sync-booking")).state == SagaState.COMPLETED
    assert await get(store, "shared", facade="async-booking") == untouched
    assert await apply(store, "shared", failed, facade="async-booking")
    assert (await get(store, "shared", facade="async-booking")).state == COMPENSATED
    assert (await get(store, "shared", facade="sync-booking")).data == data(0)


# --- concurrent changes ---------------------------------------------------------------------------

RACES: dict[str, Callable[[int], Change]] = {
    "step-ended": lambda n: StepEnded(0, f'{{"by": {n}}}', next_step="step-1"),
    "step-completed": lambda n: StepEnded(0, f'{{"by": {n}}}', complete=True),
    "step-failed": lambda n: StepFailed(0, "ABORTED", f"by {n}", undo=(0,), deadline_at=later()),
    "step-ended-or-failed": lambda n: (
        StepEnded(0, f'{{"by": {n}}}', next_step="step-1")
        if n % 2
        else StepFailed(0, "ABORTED", f"by {n}", then=COMPENSATED)
    ),
    "step-pending": lambda n: StepPending(0, f"by {n}"),
    "compensation-ended": lambda n: (
        CompensationEnded(COMPENSATED, done=(0,))
        if n % 2
        else CompensationEnded(COMPENSATION_FAILED, failed=0, error=f"by {n}")
    ),
}


@pytest.mark.parametrize("race", list(RACES))
async def test_concurrent_duplicate_changes_from_two_store_instances_apply_exactly_once(
    backend: Backend, race: str
) -> None:
    stores = [backend.store, await backend.another()]
    await at_step(stores[0], "r1", 0)
    if race == "compensation-ended":
        failed = StepFailed(0, "ABORTED", "x", undo=(0,), deadline_at=later())
        assert await apply(stores[0], "r1", failed)
    start = await get(stores[0], "r1")
    changes = [RACES[race](n) for n in range(50)]

    applied = await asyncio.gather(
        *(stores[n % 2].apply(FACADE, "r1", change) for n, change in enumerate(changes))
    )

    assert applied.count(True) == 1, applied
    winner = changes[applied.index(True)]
    saga = await get(stores[0], "r1")
    check_journal(saga)
    assert await get(stores[1], "r1") == saga
    expected = transition(start, winner, datetime.now(UTC))
    assert expected is not None
    assert shape(saga) == shape(expected)  # the winner's change, applied once


# --- claiming stalled sagas -----------------------------------------------------------------------


async def silence(store: SagaStore, *silent: str, alive: str = "alive") -> float:
    """Heartbeats of `silent` replicas, then, a moment later, of `alive`: the `stale_after`
    to claim with, which finds the first stale and the second fresh."""
    for owner in silent:
        await store.heartbeat(owner)
    await asyncio.sleep(0.3)
    await store.heartbeat(alive)
    return 0.15


def claimed(stalled: list[Any]) -> dict[str, bool]:
    return {each.saga.request_id: each.expired for each in stalled}


async def test_claim_takes_running_and_compensating_sagas_past_their_deadline(
    store: SagaStore,
) -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    for kind in ("sync", "async"):
        await at_step(store, f"running-{kind}", 1, kind=kind, owner="alive", deadline_at=past)
        await compensating(store, f"compensating-{kind}", kind=kind, owner="alive")
        failed = StepFailed(0, "ABORTED", "x", undo=(0,), deadline_at=past)
        await at_step(store, f"late-compensating-{kind}", 0, kind=kind, owner="alive")
        assert await apply(store, f"late-compensating-{kind}", failed)
    await store.heartbeat("alive")

    stalled = await store.claim_stalled("me", stale_after=60, hold_for=30)

    assert claimed(stalled) == {
        "running-sync": True,
        "running-async": True,
        "late-compensating-sync": True,
        "late-compensating-async": True,
    }
    assert {each.saga.state for each in stalled} == {SagaState.RUNNING, COMPENSATING}


async def test_claim_takes_running_sync_sagas_of_silent_or_never_seen_replicas(
    store: SagaStore,
) -> None:
    await at_step(store, "of-silent", 1, owner="silent")
    await at_step(store, "of-ghost", 0, owner="ghost")  # never beat
    await at_step(store, "of-alive", 0, owner="alive")
    stale_after = await silence(store, "silent")

    stalled = await store.claim_stalled("me", stale_after=stale_after, hold_for=30)

    assert claimed(stalled) == {"of-silent": False, "of-ghost": False}
    assert [step.state for step in (await get(store, "of-silent")).steps] == [
        StepState.DONE,
        StepState.RUNNING,
    ]


async def test_claim_leaves_async_finished_and_fresh_sagas_alone(store: SagaStore) -> None:
    await at_step(store, "async-of-silent", 1, kind="async", owner="silent")
    await compensating(store, "compensating-of-silent", owner="silent")  # a sync one
    for state in (SagaState.COMPLETED, COMPENSATED, COMPENSATION_FAILED):
        saga = await finished(store, f"{state}-of-ghost", state)
        assert saga.owner == "replica-a"  # never beat
    await at_step(store, "sync-of-alive", 1, owner="alive")
    await at_step(store, "mine", 0, owner="me")  # the claimer's own, though it never beat
    stale_after = await silence(store, "silent")
    everything = list((await store.list_sagas(page_size=100)).sagas)

    assert await store.claim_stalled("me", stale_after=stale_after, hold_for=30) == []

    assert list((await store.list_sagas(page_size=100)).sagas) == everything


async def test_a_claimed_saga_is_the_claimers_until_hold_for_from_now(backend: Backend) -> None:
    store = backend.store
    past = datetime.now(UTC) - timedelta(seconds=1)
    await at_step(store, "expired", 1, owner="alive", deadline_at=past)
    await at_step(store, "orphan", 1, owner="ghost")
    await store.heartbeat("alive")

    before = datetime.now(UTC)
    stalled = await store.claim_stalled("me", stale_after=60, hold_for=30)
    after = datetime.now(UTC)

    assert claimed(stalled) == {"expired": True, "orphan": False}
    other = await backend.another()
    for each in stalled:
        saga = each.saga
        assert saga.owner == "me"
        assert saga.deadline_at is not None
        assert before + timedelta(seconds=30) <= saga.deadline_at <= after + timedelta(seconds=30)
        assert await get(store, saga.request_id) == saga
        assert await get(other, saga.request_id) == saga
    # Held: nothing is stalled any more, for the claimer or another replica.
    assert await store.claim_stalled("me", stale_after=60, hold_for=30) == []
    await store.heartbeat("me")
    assert await other.claim_stalled("you", stale_after=60, hold_for=30) == []


async def test_two_replicas_claiming_at_once_split_the_stalled_sagas(
    backend: Backend, request: pytest.FixtureRequest
) -> None:
    first, second = backend.store, await backend.another()
    await first.heartbeat("a")
    await second.heartbeat("b")

    async def claim_all(store: SagaStore, me: str) -> list[str]:
        taken: list[str] = []
        while batch := await store.claim_stalled(me, stale_after=60, hold_for=300):
            assert all(each.saga.owner == me for each in batch)
            taken += [each.saga.request_id for each in batch]
        return taken

    # A few rounds: each is a race, which a wrong store need not lose every time.
    for race in range(3):
        # Of a replica never seen, all of them; every other one past its deadline as well.
        past = datetime.now(UTC) - timedelta(seconds=1)
        stalled = [f"stalled-{race}-{i:03d}" for i in range(150)]
        await asyncio.gather(
            *(
                at_step(first, request_id, 0, owner="dead", deadline_at=past if i % 2 else None)
                for i, request_id in enumerate(stalled)
            )
        )

        by_a, by_b = await asyncio.gather(claim_all(first, "a"), claim_all(second, "b"))

        assert not set(by_a) & set(by_b)
        assert sorted(by_a + by_b) == stalled
        for request_id in by_a:
            assert (await get(second, request_id)).owner == "a"
        for request_id in by_b:
            assert (await get(first, request_id)).owner == "b"


async def test_a_claim_takes_at_most_claim_batch_sagas_and_the_next_the_rest(
    backend: Backend, request: pytest.FixtureRequest
) -> None:
    store = backend.store
    past = datetime.now(UTC) - timedelta(seconds=1)
    total = CLAIM_BATCH + 20
    await asyncio.gather(
        *(at_step(store, f"orphan-{i:03d}", 0, owner="ghost") for i in range(total // 2)),
        *(
            at_step(store, f"expired-{i:03d}", 0, owner="alive", deadline_at=past)
            for i in range(total - total // 2)
        ),
    )
    await store.heartbeat("alive")

    first = await store.claim_stalled("me", stale_after=60, hold_for=300)
    second = await store.claim_stalled("me", stale_after=60, hold_for=300)

    assert (len(first), len(second)) == (CLAIM_BATCH, total - CLAIM_BATCH)


# --- what every change keeps ----------------------------------------------------------------------


def random_change(rng: random.Random, saga: SagaRecord, n: int) -> Change:
    """A change the engine could send (or a stale or duplicate one), aimed near the
    saga's last step."""
    last = len(saga.steps) - 1
    index = rng.choice([last, last, last, last - 1, last + 1])
    steps = range(last + 2)
    kind = rng.randrange(8)
    if kind == 0:
        return StepRestarted(index)
    if kind == 1:
        return StepPending(index, f"pending {n}")
    if kind in (2, 3):
        if last < 4 and kind == 2:
            return StepEnded(index, f'{{"n": {n}}}', next_step=f"step-{index + 1}")
        return StepEnded(index, f'{{"n": {n}}}', complete=True)
    if kind == 4:
        undo = tuple(sorted(rng.sample(steps, rng.randrange(len(steps) + 1))))
        return StepFailed(
            index,
            "ABORTED",
            f"failed {n}",
            undo=undo,
            deadline_at=later(),
            data=rng.choice([None, f'{{"failed": {n}}}']),
        )
    if kind == 5:
        return StepFailed(index, "UNAVAILABLE", f"failed {n}", then=COMPENSATED)
    done = tuple(sorted(rng.sample(steps, rng.randrange(len(steps) + 1))))
    if kind == 6:
        return CompensationEnded(COMPENSATED, done=done)
    failed = rng.choice([i for i in steps if i not in done] or [last + 1])
    return CompensationEnded(
        COMPENSATION_FAILED, done=done, failed=failed, error=rng.choice(["", f"undo {n}"])
    )


def random_operator_change(rng: random.Random, saga: SagaRecord, n: int) -> OperatorChange:
    """A move an operator could make, mostly one that fits what they see of the saga (a
    stale one otherwise: they act on what they saw)."""
    last = len(saga.steps) - 1
    kind = rng.randrange(3)
    if saga.state == COMPENSATION_FAILED and rng.randrange(2) == 0:
        kind = 1
    if kind == 0:
        return Retried(rng.choice([last, last, last - 1, last + 1]), later(600 + n))
    if kind == 1:
        return CompensationRetried(later(900 + n))
    seen = saga.state if saga.state in RESOLVABLE and rng.randrange(2) else None
    return Resolved(seen or rng.choice(sorted(RESOLVABLE)), f"resolved {n}")


async def test_every_store_follows_the_reference_semantics_and_keeps_the_invariant(
    store: SagaStore,
) -> None:
    # Random runs of changes, stale and duplicate ones among them, on 40 sagas at once:
    # each change must be applied exactly when `orchestrator.store.memory.transition` says
    # (an operator's, sent through `act`, when `operator_transition` does), with the record
    # it says, and leave the journal's invariant standing. An `act` applied, and only then,
    # adds its action to the saga's record; some of the engine's changes go through `act`.
    ids = [f"walk-{i:02d}" for i in range(40)]
    await asyncio.gather(*(store.begin(new_saga(request_id)) for request_id in ids))

    walks = {request_id: random.Random(f"journal-{request_id}") for request_id in ids}
    # The operators' choices draw on streams of their own.
    operators = {request_id: random.Random(f"operator-{request_id}") for request_id in ids}
    reached: set[SagaState] = set()

    async def one_change(request_id: str, n: int) -> str:
        rng, operator = walks[request_id], operators[request_id]
        before = await get(store, request_id)
        recorded = await store.actions(FACADE, request_id)
        done = action(f"walk-{n}")
        move: Change | OperatorChange
        # Operators mostly act on sagas the engine gave up on.
        if operator.randrange(4 if before.state != COMPENSATION_FAILED else 2) == 0:
            move = random_operator_change(operator, before, n)
            expected = operator_transition(before, move, datetime.now(UTC))
            acted = True
        else:
            move = random_change(rng, before, n)
            expected = transition(before, move, datetime.now(UTC))
            acted = operator.randrange(5) == 0
        if acted:
            applied = await act(store, request_id, move, done)
        else:
            assert not isinstance(move, Retried | CompensationRetried | Resolved)
            applied = await apply(store, request_id, move)
        after = await get(store, request_id)
        assert applied == (expected is not None), (before, move)
        assert shape(after) == shape(expected or before), (before, move)
        if not applied:
            assert after == before
        added = [done] if applied and acted else []
        assert await store.actions(FACADE, request_id) == [*recorded, *added], (before, move)
        reached.add(after.state)
        return f"{type(move).__name__}:{applied}"

    outcomes: list[str] = []
    for n in range(10):
        outcomes += await asyncio.gather(*(one_change(request_id, n) for request_id in ids))

    # The walk went everywhere: every kind of change, both applied and refused, and every
    # state (some only on the way: operators take sagas out of COMPENSATION_FAILED).
    kinds = {"StepRestarted", "StepPending", "StepEnded", "StepFailed", "CompensationEnded"}
    kinds |= {"Retried", "CompensationRetried", "Resolved"}
    assert {outcome.split(":")[0] for outcome in outcomes if outcome.endswith("True")} == kinds
    assert {outcome.split(":")[0] for outcome in outcomes if outcome.endswith("False")} == kinds
    assert reached == set(SagaState)


async def test_the_sagas_data_is_its_last_finished_steps(store: SagaStore) -> None:
    await at_step(store, "d1", 0)
    assert (await get(store, "d1")).data == ""
    assert await apply(store, "d1", StepEnded(0, '{"n": 0}', next_step="step-1"))
    after_first = await get(store, "d1")
    assert await apply(store, "d1", StepRestarted(1))
    restarted = await get(store, "d1")
    assert await apply(store, "d1", StepEnded(1, '{"n": 1}', complete=True))

    assert (after_first.data, restarted.data) == ('{"n": 0}', '{"n": 0}')
    final = await get(store, "d1")
    assert (final.data, final.state) == ('{"n": 1}', SagaState.COMPLETED)


UPDATES: dict[str, tuple[int, Callable[[], Change]]] = {
    # A change, and the step the saga is at (or COMPENSATING after, -1) before it.
    "step-ended": (0, lambda: StepEnded(0, data(0), next_step="step-1")),
    "step-completed": (0, lambda: StepEnded(0, data(0), complete=True)),
    "step-restarted": (0, lambda: StepRestarted(0)),
    "step-pending": (0, lambda: StepPending(0, "broker down")),
    "step-failed": (0, lambda: StepFailed(0, "ABORTED", "x", undo=(0,), deadline_at=later())),
    "compensation-ended": (-1, lambda: CompensationEnded(COMPENSATED, done=(0, 1))),
}


@pytest.mark.parametrize("update", list(UPDATES))
async def test_an_applied_change_moves_updated_at(
    backend: Backend, update: str, request: pytest.FixtureRequest
) -> None:
    store = backend.store
    at, change = UPDATES[update]
    before = await (compensating(store, "u1") if at < 0 else at_step(store, "u1", at))
    await asyncio.sleep(0.002)

    assert await apply(store, "u1", change())

    assert (await get(store, "u1")).updated_at > before.updated_at
    assert (await get(await backend.another(), "u1")).updated_at > before.updated_at


@pytest.mark.parametrize(
    "ending", ["completed", "failed-with-nothing-to-undo", "compensated", "compensation-failed"]
)
async def test_a_finished_saga_has_no_deadline(
    backend: Backend, ending: str, request: pytest.FixtureRequest
) -> None:
    store = backend.store
    if ending == "failed-with-nothing-to-undo":
        await at_step(store, "f1", 0)
        # A deadline given all the same: a finished saga has none, whatever the change said.
        change = StepFailed(0, "ABORTED", "x", deadline_at=later(), then=COMPENSATED)
        assert await apply(store, "f1", change)
    else:
        state = {
            "completed": SagaState.COMPLETED,
            "compensated": COMPENSATED,
            "compensation-failed": COMPENSATION_FAILED,
        }[ending]
        await finished(store, "f1", state)

    saga = await get(store, "f1")
    assert saga.finished
    assert saga.deadline_at is None


async def test_a_sagas_position_is_what_its_record_says_at_every_stage(store: SagaStore) -> None:
    await at_step(store, "p1", 1)
    await compensating(store, "p2")
    await finished(store, "p3", SagaState.COMPLETED)
    await finished(store, "p4", SagaState.COMPENSATION_FAILED)

    for request_id in ("p1", "p2", "p3", "p4"):
        record = await get(store, request_id)
        assert await store.position(FACADE, request_id) == Position.of(record), request_id
    assert await store.position(FACADE, "nobody") is None
