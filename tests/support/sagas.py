"""Driving many bookings and judging how each saga ended, from the upstream ledgers and the
orchestrator's dead-letter list."""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from orchestrator import Orchestrator
from orchestrator.store import DeadLetterRecord
from pb import booking_pb2, booking_pb2_grpc
from upstream.ledger import Ledger


class Outcome(enum.Enum):
    """How a saga stands, judged from the order and payment ledgers."""

    COMPLETED = "completed"  # one CREATED order, one PAID payment
    COMPENSATED = "compensated"  # an order CANCELLED, no payment PAID
    NOTHING = "nothing"  # nothing created
    HALF_DONE = "half-done"  # anything else: the bug these tests hunt
    DUPLICATED = "duplicated"  # more than one order or payment for one request id


def outcome_of(request_id: str, orders: Ledger, payments: Ledger) -> Outcome:
    """The outcome of `request_id`'s saga."""
    if orders.count_orders(request_id) > 1 or payments.count_payments(request_id) > 1:
        return Outcome.DUPLICATED
    order = orders.latest_order_of(request_id)
    payment = payments.latest_payment_of(request_id)
    if order is None and payment is None:
        return Outcome.NOTHING
    if order is not None and order.status == "CREATED" and payment and payment.status == "PAID":
        return Outcome.COMPLETED
    if (
        order is not None
        and order.status == "CANCELLED"
        and (payment is None or payment.status == "REFUNDED")
    ):
        return Outcome.COMPENSATED
    return Outcome.HALF_DONE


@dataclass
class Load:
    """A batch of async bookings: which ids were accepted and which asked for a fault."""

    size: int
    fault_every: int = 5
    """Every fault_every-th booking asks for a fault; 0 means none, 1 means all."""
    prefix: str = field(default_factory=lambda: f"load-{uuid.uuid4().hex[:8]}")
    accepted: set[str] = field(default_factory=set)
    _milestones: dict[int, asyncio.Event] = field(default_factory=dict)

    @property
    def request_ids(self) -> list[str]:
        """Every request id of the batch, in order."""
        return [f"{self.prefix}-{i}" for i in range(self.size)]

    def faulty(self, request_id: str) -> bool:
        """Whether this booking asks the payment to decline."""
        index = int(request_id.rsplit("-", 1)[1])
        return bool(self.fault_every) and (index + 1) % self.fault_every == 0

    def expected(self, request_id: str) -> Outcome:
        """The outcome the booking must reach once accepted."""
        return Outcome.COMPENSATED if self.faulty(request_id) else Outcome.COMPLETED

    async def submit(
        self,
        stub: booking_pb2_grpc.BookingServiceAsyncStub,
        *,
        concurrency: int = 32,
        retry_for: float = 60.0,
    ) -> None:
        """Submit every booking, retrying UNAVAILABLE with the same request id like a client."""
        gate = asyncio.Semaphore(concurrency)

        async def one(request_id: str) -> None:
            async with gate:
                request = booking_pb2.BookingRequest(
                    ProductID=1, Count=1, FaultInject=self.faulty(request_id)
                )
                async with asyncio.timeout(retry_for):
                    while True:
                        try:
                            await stub.HandleAsyncBooking(
                                request, metadata=(("x-request-id", request_id),), timeout=5
                            )
                        except grpc.aio.AioRpcError as exc:
                            if exc.code() not in (
                                grpc.StatusCode.UNAVAILABLE,
                                grpc.StatusCode.DEADLINE_EXCEEDED,
                            ):
                                raise
                            await asyncio.sleep(0.2)
                            continue
                        self.accepted.add(request_id)
                        milestone = self._milestones.get(len(self.accepted))
                        if milestone is not None:
                            milestone.set()
                        return

        await asyncio.gather(*(one(rid) for rid in self.request_ids))

    async def accepted_at_least(self, count: int) -> None:
        """Wait until `count` bookings have been accepted."""
        if len(self.accepted) < count:
            await self._milestones.setdefault(count, asyncio.Event()).wait()

    def tally(self, orders: Ledger, payments: Ledger) -> dict[Outcome, int]:
        """How many bookings stand at each outcome."""
        counts = dict.fromkeys(Outcome, 0)
        for request_id in self.request_ids:
            counts[outcome_of(request_id, orders, payments)] += 1
        return counts

    def wrong(self, orders: Ledger, payments: Ledger) -> dict[str, Outcome]:
        """Bookings not (yet) at their expected outcome."""
        return {
            rid: got
            for rid in self.request_ids
            if (got := outcome_of(rid, orders, payments)) != self.expected(rid)
        }

    async def settle(self, orders: Ledger, payments: Ledger, *, within: float = 90.0) -> None:
        """Wait until every booking reached its expected outcome; fail with the stragglers."""
        try:
            async with asyncio.timeout(within):
                # The ledgers are another service's state; they send no events.
                while self.wrong(orders, payments):  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
        except TimeoutError:
            stragglers = self.wrong(orders, payments)
            sample = dict(list(stragglers.items())[:10])
            raise AssertionError(
                f"{len(stragglers)} of {self.size} bookings did not settle: {sample}; "
                f"tally {self.tally(orders, payments)}"
            ) from None


async def kept_dead_letters(
    orchestrator: Orchestrator, topics: Iterable[str], count: int, *, within: float = 30
) -> dict[str, DeadLetterRecord]:
    """The dead letters the orchestrator kept from `topics` (once there are at least
    `count`), by message id; fails after `within` seconds."""
    found: dict[str, DeadLetterRecord] = {}
    async with asyncio.timeout(within):
        while len(found) < count:
            for topic in topics:
                page = await orchestrator.store.list_dead_letters(topic=topic, page_size=500)
                found.update({letter.message_id: letter for letter in page.letters})
            if len(found) < count:
                await asyncio.sleep(0.05)
    return found
