"""The trip saga: reserve a seat, book a room, charge the card, each undone on its own.

An async facade: each step is a hop through a broker topic, carrying the
`TripDTO`; a step that fails rolls the trip back through the rollback topic,
where each completed step's compensation undoes it, latest first, by the
idempotency key its action used (so it undoes exactly that booking, even when
the action's answer was lost).
"""

from __future__ import annotations

from pydantic import Field

from examples.trip.services import FARE, NIGHTLY_RATE, TripServices
from orchestrator.context import current_step, idempotency_key
from orchestrator.dto import AsyncFacadeContext
from orchestrator.facade.async_ import AsyncFacade
from orchestrator.registry import Orchestrator

__all__ = ["ROLLBACK_TOPIC", "STEPS", "TOPICS", "TRIP", "TripDTO", "register_trip"]

TRIP = "Trip"
"""The facade's name."""
STEPS = ("reserve_seat", "book_room", "charge_card")
"""Its steps, in order."""
TOPICS = ("trip.seat", "trip.room", "trip.charge")
"""The topic each step's hop travels on."""
ROLLBACK_TOPIC = "trip.rollback"


class TripDTO(AsyncFacadeContext):
    """What travels from hop to hop: the trip asked for, and what each step booked."""

    flight: str = Field(pattern=r"^[A-Z0-9]{3,8}$")
    nights: int = Field(ge=1, le=30)
    card: str = Field(min_length=4, max_length=32)
    seat: str = ""
    room: str = ""
    charge: str = ""


def register_trip(orchestrator: Orchestrator, services: TripServices) -> AsyncFacade[TripDTO]:
    """Register the trip facade on `orchestrator`, booking with `services`."""

    async def reserve_seat(dto: TripDTO) -> TripDTO:
        dto.seat = await services.airline.reserve(idempotency_key(), dto.request_id, dto.flight)
        return dto

    async def book_room(dto: TripDTO) -> TripDTO:
        dto.room = await services.hotel.book_room(idempotency_key(), dto.request_id, dto.nights)
        return dto

    async def charge_card(dto: TripDTO) -> TripDTO:
        amount = FARE + NIGHTLY_RATE * dto.nights
        dto.charge = await services.bank.charge(idempotency_key(), dto.request_id, dto.card, amount)
        return dto

    # Each compensation undoes what its step's action made, by that action's key.
    async def release_seat(dto: TripDTO) -> None:
        await services.airline.release(current_step().action_key)

    async def cancel_room(dto: TripDTO) -> None:
        await services.hotel.cancel(current_step().action_key)

    async def refund_card(dto: TripDTO) -> None:
        await services.bank.refund(current_step().action_key)

    flow = AsyncFacade(dto=TripDTO)
    flow.use(TOPICS[0], reserve_seat, compensate=release_seat)
    flow.use(TOPICS[1], book_room, compensate=cancel_room)
    flow.use(TOPICS[2], charge_card, compensate=refund_card)
    flow.consume_rollback(ROLLBACK_TOPIC)
    orchestrator.register_async_facade(TRIP, flow)
    return flow
