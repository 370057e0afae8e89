"""The trip's upstream services, in process: an airline, a hotel and a bank.

Each keeps a ledger of what it did, keyed by the idempotency key of the saga
step that asked (`idempotency_key()`), as a real upstream dedupes on the
`x-idempotency-key` metadata: asking twice with one key books once and
answers the same booking. Undoing names the key of the booking it undoes,
and leaves a tombstone: a booking asked for after its undo (a retry that
lost the race with the rollback) is refused, so nothing is left behind.
Refusals raise the framework's errors, as the gRPC statuses an upstream
would answer with: `FailedPrecondition` (sold out, declined), `Unavailable`.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

from orchestrator.errors import FailedPrecondition

__all__ = [
    "DECLINED_CARD",
    "FARE",
    "NIGHTLY_RATE",
    "Airline",
    "Bank",
    "Booking",
    "Desk",
    "Hotel",
    "Status",
    "TripServices",
]

DECLINED_CARD = "4000-0000-0000-0002"
"""The card the bank declines."""
FARE = 200
"""What a seat costs."""
NIGHTLY_RATE = 120
"""What a night at the hotel costs."""


class Status(enum.StrEnum):
    """Where a booking stands."""

    BOOKED = "BOOKED"
    UNDONE = "UNDONE"


@dataclass
class Booking:
    """One booking a service made: a seat, a room or a charge."""

    id: str
    request_id: str
    what: str
    status: Status = Status.BOOKED


class Desk:
    """One service's ledger: bookings made by idempotency key, undone by that key."""

    def __init__(self, name: str, prefix: str, capacity: int | None = None) -> None:
        self.name = name
        self._prefix = prefix
        self._capacity = capacity
        self.bookings: dict[str, Booking] = {}
        """Every booking made, by the key that made it."""
        self.calls: Counter[str] = Counter()
        """How many times it was asked to `book` and to `undo` (replays included)."""
        self._tombstones: set[str] = set()

    def book(self, key: str, request_id: str, what: str) -> Booking:
        """Make a booking under `key`, or answer the one `key` made before."""
        self.calls["book"] += 1
        made = self.bookings.get(key)
        if made is not None:
            return made
        if key in self._tombstones:
            raise FailedPrecondition(f"{self.name}: {key} was cancelled before it was made")
        if self._capacity is not None and len(self.active()) >= self._capacity:
            raise FailedPrecondition(f"{self.name}: sold out")
        booking = Booking(f"{self._prefix}{len(self.bookings) + 1}", request_id, what)
        self.bookings[key] = booking
        return booking

    def undo(self, key: str) -> Booking | None:
        """Undo what `key` booked (nothing when it booked nothing); refuse `key` from now on."""
        self.calls["undo"] += 1
        self._tombstones.add(key)
        booking = self.bookings.get(key)
        if booking is not None:
            booking.status = Status.UNDONE
        return booking

    def active(self) -> list[Booking]:
        """The bookings not undone."""
        return [b for b in self.bookings.values() if b.status == Status.BOOKED]

    def of(self, request_id: str) -> list[Booking]:
        """Every booking made for the trip `request_id`, in order."""
        return [b for b in self.bookings.values() if b.request_id == request_id]


class Airline(Desk):
    """Seats on flights, as many as `seats` at once."""

    def __init__(self, seats: int = 100) -> None:
        super().__init__("airline", "S", capacity=seats)

    async def reserve(self, key: str, request_id: str, flight: str) -> str:
        """Reserve a seat on `flight`; its id."""
        return self.book(key, request_id, f"a seat on {flight}").id

    async def release(self, key: str) -> None:
        """Release the seat `key` reserved."""
        self.undo(key)


class Hotel(Desk):
    """Rooms, as many as `rooms` at once."""

    def __init__(self, rooms: int = 100) -> None:
        super().__init__("hotel", "R", capacity=rooms)

    async def book_room(self, key: str, request_id: str, nights: int) -> str:
        """Book a room for `nights`; its id."""
        return self.book(key, request_id, f"a room for {nights} nights").id

    async def cancel(self, key: str) -> None:
        """Cancel the room `key` booked."""
        self.undo(key)


class Bank(Desk):
    """Card payments; it declines `DECLINED_CARD`."""

    def __init__(self) -> None:
        super().__init__("bank", "C")

    async def charge(self, key: str, request_id: str, card: str, amount: int) -> str:
        """Charge `amount` to `card`; the charge's id."""
        if card == DECLINED_CARD:
            raise FailedPrecondition(f"bank: card {card} declined")
        return self.book(key, request_id, f"{amount} charged").id

    async def refund(self, key: str) -> None:
        """Refund the charge `key` made."""
        self.undo(key)


@dataclass
class TripServices:
    """The three services a trip books with."""

    airline: Airline = field(default_factory=Airline)
    hotel: Hotel = field(default_factory=Hotel)
    bank: Bank = field(default_factory=Bank)
