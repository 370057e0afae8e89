"""`python -m examples.trip`: book two trips on an embedded orchestrator, show how each ended.

The first trip is booked; the second one's card is declined, so its seat and
its room are given back. Everything runs in this process: the in-memory
broker and saga store, and the three services.
"""

from __future__ import annotations

import asyncio

from examples.trip.saga import TRIP, TripDTO, register_trip
from examples.trip.services import DECLINED_CARD, Desk, TripServices
from orchestrator.broker.memory import InMemoryBroker
from orchestrator.registry import Orchestrator

TRIPS = {
    "trip-1": TripDTO(request_id="trip-1", flight="LH123", nights=3, card="4242-4242-4242-4242"),
    "trip-2": TripDTO(request_id="trip-2", flight="LH123", nights=2, card=DECLINED_CARD),
}
WAIT_SECONDS = 10.0


async def main() -> None:
    """Book `TRIPS`, wait for each saga's end, print it and the services' ledgers."""
    services = TripServices()
    orchestrator = Orchestrator(InMemoryBroker())
    flow = register_trip(orchestrator, services)
    await orchestrator.start()
    try:
        for request_id, trip in TRIPS.items():
            await flow.run(request_id, trip)  # returns once the first hop is with the broker
        for request_id in TRIPS:
            async with asyncio.timeout(WAIT_SECONDS):
                saga = await flow.wait_for(request_id)
            steps = ", ".join(
                f"{step.name} {step.state}" + (" (undone)" if step.compensation == "DONE" else "")
                for step in saga.steps
            )
            why = f": {saga.error_reason}" if saga.error_reason else ""
            print(f"{TRIP}/{request_id}  {saga.state:<12} {steps}{why}")
        for desk in (services.airline, services.hotel, services.bank):
            print(ledger(desk))
    finally:
        await orchestrator.close()


def ledger(desk: Desk) -> str:
    """A service's bookings in a line."""
    bookings = "; ".join(
        f"{b.id} {b.what} for {b.request_id}: {b.status}" for b in desk.bookings.values()
    )
    return f"{desk.name}: {bookings or 'nothing'}"


if __name__ == "__main__":
    asyncio.run(main())
