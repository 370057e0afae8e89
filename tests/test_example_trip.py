"""The trip of `examples/trip`, tested as its author would: with the test kit.

The facade is registered by its own `register_trip` on the kit's orchestrator
(the in-memory broker, an in-memory or SQLite store); each test books a trip
and judges it from the services' ledgers (what was booked, undone, and how
often each was asked) and from the saga's record.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from examples.trip import DECLINED_CARD, STEPS, TRIP, TripDTO, TripServices, register_trip
from examples.trip.services import Status
from orchestrator.testing import Registration, SagaKit, assert_saga

ROOT = Path(__file__).resolve().parent.parent
GOOD_CARD = "4242-4242-4242-4242"


@pytest.fixture
def services() -> TripServices:
    return TripServices()


@pytest.fixture
def orchestrator_facades(services: TripServices) -> Sequence[Registration]:
    return [lambda orchestrator: register_trip(orchestrator, services)]


def trip(request_id: str, card: str = GOOD_CARD) -> TripDTO:
    return TripDTO(request_id=request_id, flight="LH123", nights=2, card=card)


def statuses(services: TripServices, request_id: str) -> dict[str, list[Status]]:
    """Each service's bookings of the trip, by status, oldest first."""
    return {
        desk.name: [booking.status for booking in desk.of(request_id)]
        for desk in (services.airline, services.hotel, services.bank)
    }


async def test_a_trip_books_a_seat_a_room_and_charges_the_card(
    orchestrator_kit: SagaKit, services: TripServices
) -> None:
    run = await orchestrator_kit.run(TRIP, "t-1", trip("t-1"))

    assert_saga(run, state="COMPLETED", done=list(STEPS), compensated=[])
    assert statuses(services, "t-1") == {
        "airline": [Status.BOOKED],
        "hotel": [Status.BOOKED],
        "bank": [Status.BOOKED],
    }
    assert services.bank.of("t-1")[0].what == "440 charged"


async def test_a_declined_card_gives_back_the_seat_and_the_room(
    orchestrator_kit: SagaKit, services: TripServices
) -> None:
    run = await orchestrator_kit.run(TRIP, "t-2", trip("t-2", card=DECLINED_CARD))

    assert_saga(
        run,
        state="COMPENSATED",
        failed="charge_card",
        compensated=["reserve_seat", "book_room"],
        error_code="FAILED_PRECONDITION",
    )
    assert statuses(services, "t-2") == {
        "airline": [Status.UNDONE],
        "hotel": [Status.UNDONE],
        "bank": [],
    }


async def test_a_full_hotel_gives_back_the_seat_only(
    orchestrator_kit: SagaKit, services: TripServices
) -> None:
    orchestrator_kit.faults.fail("book_room")

    run = await orchestrator_kit.run(TRIP, "t-3", trip("t-3"))

    assert_saga(run, state="COMPENSATED", failed="book_room", compensated=["reserve_seat"])
    assert statuses(services, "t-3") == {"airline": [Status.UNDONE], "hotel": [], "bank": []}
    assert services.hotel.calls["book"] == 0


async def test_a_room_whose_answer_was_lost_once_is_booked_once(
    orchestrator_kit: SagaKit, services: TripServices
) -> None:
    lost = orchestrator_kit.faults.lose_answer("book_room", times=1)

    run = await orchestrator_kit.run(TRIP, "t-4", trip("t-4"))

    assert_saga(run, state="COMPLETED", done=list(STEPS))
    assert lost.hits == 1 and services.hotel.calls["book"] == 2
    assert statuses(services, "t-4")["hotel"] == [Status.BOOKED]


async def test_a_room_whose_answers_are_all_lost_is_cancelled_by_its_key(
    orchestrator_kit: SagaKit, services: TripServices
) -> None:
    orchestrator_kit.faults.lose_answer("book_room")

    run = await orchestrator_kit.run(TRIP, "t-5", trip("t-5"))

    # The room was booked (each retry answered the same booking), then undone with the seat.
    assert_saga(
        run,
        state="COMPENSATED",
        failed="book_room",
        compensated=["reserve_seat", "book_room"],
        error_code="UNAVAILABLE",
    )
    assert statuses(services, "t-5") == {
        "airline": [Status.UNDONE],
        "hotel": [Status.UNDONE],
        "bank": [],
    }


async def test_a_trip_whose_orchestrator_crashed_after_the_room_is_completed_once(
    orchestrator_kit: SagaKit, services: TripServices
) -> None:
    orchestrator_kit.faults.crash_after("book_room")

    run = await orchestrator_kit.run(TRIP, "t-6", trip("t-6"))
    assert run.crashed
    assert_saga(run, state="RUNNING", done=["reserve_seat"])

    saga = await orchestrator_kit.recover()

    # The room's hop was delivered again to the new orchestrator: booked again, by its key.
    assert_saga(saga, state="COMPLETED", done=list(STEPS), attempts={"book_room": 2})
    assert services.hotel.calls["book"] == 2
    assert statuses(services, "t-6") == {
        "airline": [Status.BOOKED],
        "hotel": [Status.BOOKED],
        "bank": [Status.BOOKED],
    }


async def test_a_room_that_cannot_be_cancelled_leaves_the_trip_compensation_failed(
    orchestrator_kit: SagaKit, services: TripServices
) -> None:
    orchestrator_kit.faults.fail("charge_card", error=TimeoutError())  # the charge may be made
    orchestrator_kit.faults.fail_compensation("book_room")

    run = await orchestrator_kit.run(TRIP, "t-7", trip("t-7"))

    assert_saga(
        run,
        state="COMPENSATION_FAILED",
        failed="charge_card",
        compensated=["charge_card"],
        compensation_failed="book_room",
    )
    assert statuses(services, "t-7") == {
        "airline": [Status.BOOKED],
        "hotel": [Status.BOOKED],
        "bank": [],
    }


async def test_a_trip_crashed_on_a_sqlite_journal_is_completed_by_the_next_orchestrator(
    services: TripServices, orchestrator_sqlite_url: str
) -> None:
    kit = SagaKit(
        lambda orchestrator: register_trip(orchestrator, services),
        store_url=orchestrator_sqlite_url,
    )
    async with kit:
        kit.faults.crash_after("reserve_seat")
        run = await kit.run(TRIP, "t-8", trip("t-8"))
        saga = await kit.recover()

    assert run.crashed
    assert_saga(saga, state="COMPLETED", done=list(STEPS), attempts={"reserve_seat": 2})
    assert services.airline.calls["book"] == 2
    assert statuses(services, "t-8") == {
        "airline": [Status.BOOKED],
        "hotel": [Status.BOOKED],
        "bank": [Status.BOOKED],
    }


def test_python_m_examples_trip_books_one_trip_and_gives_back_the_other() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "examples.trip"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["Trip/trip-1", "COMPLETED"]
    assert lines[1].split()[:2] == ["Trip/trip-2", "COMPENSATED"]
    assert "card 4000-0000-0000-0002 declined" in lines[1]
    assert lines[2:] == [
        "airline: S1 a seat on LH123 for trip-1: BOOKED; S2 a seat on LH123 for trip-2: UNDONE",
        "hotel: R1 a room for 3 nights for trip-1: BOOKED; R2 a room for 2 nights for trip-2: "
        "UNDONE",
        "bank: C1 560 charged for trip-1: BOOKED",
    ]
