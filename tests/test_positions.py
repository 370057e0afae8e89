"""The positions this replica wrote spare the journal's checks a read, and never outstay it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.facade._positions import Positions, advanced
from orchestrator.store import (
    Change,
    CompensationEnded,
    InMemorySagaStore,
    NewSaga,
    Position,
    SagaState,
    StepEnded,
    StepFailed,
    StepPending,
    StepRestarted,
    StepState,
)

RUNNING = Position(SagaState.RUNNING, "{}", (StepState.RUNNING,), (None,))
COMPLETED = Position(SagaState.COMPLETED, "{}", (StepState.DONE,), ("{}",))

SEQUENCES: dict[str, list[Change]] = {
    "completed": [StepEnded(0, '{"a":1}', next_step="b"), StepEnded(1, '{"b":2}', complete=True)],
    "restarted": [StepRestarted(0), StepEnded(0, '{"a":1}', next_step="b")],
    "pending": [StepPending(0, "not published"), StepRestarted(0)],
    "compensated": [
        StepEnded(0, '{"a":1}', next_step="b"),
        StepFailed(1, "FAILED_PRECONDITION", "no", undo=(0,), deadline_at=None, data='{"x":1}'),
        CompensationEnded(SagaState.COMPENSATED, done=(0,)),
    ],
    "failed-at-once": [
        StepFailed(0, "ABORTED", "gone", then=SagaState.COMPENSATED, data=None),
    ],
}


@pytest.mark.parametrize("name", list(SEQUENCES))
async def test_a_position_advanced_by_each_change_is_the_one_the_store_then_holds(
    name: str,
) -> None:
    store = InMemorySagaStore()
    deadline = datetime.now(UTC) + timedelta(seconds=60)
    await store.begin(NewSaga("F", "r", "async", "{}", "h", "me", "a", deadline))
    position = RUNNING
    for change in SEQUENCES[name]:
        assert await store.apply("F", "r", change)
        position = advanced(position, change)

        assert position == await store.position("F", "r")


def test_a_written_position_is_trusted_for_its_ttl_then_read_again() -> None:
    positions = Positions(ttl=1.0)
    positions.put("r", RUNNING, now=10.0)

    assert positions.get("r", now=10.9) == RUNNING
    assert positions.get("r", now=11.1) is None
    assert positions.get("r", now=10.5) is None  # gone once stale


def test_a_finished_sagas_position_is_not_kept() -> None:
    positions = Positions(ttl=1.0)
    positions.put("r", RUNNING, now=10.0)

    positions.applied("r", StepEnded(0, "{}", complete=True), now=10.1)

    assert positions.get("r", now=10.2) is None


def test_a_refused_write_forgets_the_position() -> None:
    positions = Positions()
    positions.put("r", RUNNING, now=1.0)

    positions.forget("r")

    assert positions.get("r", now=1.0) is None


def test_only_the_most_recently_written_positions_are_kept() -> None:
    positions = Positions(capacity=2)
    for index, request_id in enumerate(("a", "b", "c")):
        positions.put(request_id, RUNNING, now=float(index))

    assert positions.get("a", now=2.0) is None
    assert positions.get("b", now=2.0) == positions.get("c", now=2.0) == RUNNING


def test_a_change_to_a_position_not_kept_keeps_nothing() -> None:
    positions = Positions()

    positions.applied("r", StepRestarted(0), now=1.0)

    assert positions.get("r", now=1.0) is None
