"""BookingService: validates the request and runs the booking facades (sync, async and
throttling)."""

from __future__ import annotations

from typing import Any

import grpc

from dto import MAX_COUNT, BookingMsgDTO
from facade import ASYNC_BOOKING, SYNC_BOOKING, THROTTLING_BOOKING
from orchestrator import (
    AsyncFacade,
    InvalidArgument,
    Orchestrator,
    SyncFacade,
    ThrottlingFacade,
    endpoint,
)
from pb import booking_pb2, booking_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def validated(request: booking_pb2.BookingRequest) -> booking_pb2.BookingRequest:
    """The request with its defaults applied; InvalidArgument when it cannot be booked.

    Every field is checked against what every node downstream can carry, so a
    bad request is refused before anything is created.
    """
    if request.ProductID <= 0:
        raise InvalidArgument(f"ProductID must be positive, got {request.ProductID}")
    if request.Count < 0:
        raise InvalidArgument(f"Count must not be negative, got {request.Count}")
    if request.Count > MAX_COUNT:
        raise InvalidArgument(f"Count must be at most {MAX_COUNT}, got {request.Count}")
    if request.Count == 0:
        request.Count = 1
    return request


class BookingHandler(booking_pb2_grpc.BookingServiceServicer):
    """Implements pb.BookingService on top of the registered booking facades."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self._sync: SyncFacade[booking_pb2.BookingRequest, booking_pb2.BookingSyncResponse] = (
            orchestrator.get_sync_facade(SYNC_BOOKING)
        )
        self._async: AsyncFacade[BookingMsgDTO] = orchestrator.get_async_facade(ASYNC_BOOKING)
        self._throttling: ThrottlingFacade[BookingMsgDTO] = orchestrator.get_throttling_facade(
            THROTTLING_BOOKING
        )

    @endpoint
    async def HandleSyncBooking(
        self, request: booking_pb2.BookingRequest, context: Context, request_id: str
    ) -> booking_pb2.BookingSyncResponse:
        """Book in the caller's request: the response carries the order and payment ids."""
        request = validated(request)
        return await self._sync.run(
            request_id, request, booking_pb2.BookingSyncResponse(RequestID=request_id)
        )

    @endpoint
    async def HandleThrottlingBooking(
        self, request: booking_pb2.BookingRequest, context: Context, request_id: str
    ) -> booking_pb2.BookingSyncResponse:
        """Book through the broker at the pace its topics allow; answer once the saga ended."""
        booked = await self._throttling.run(request_id, _dto(request_id, validated(request)))
        return booking_pb2.BookingSyncResponse(
            RequestID=request_id, OrderID=booked.order_id, PaymentID=booked.payment_id
        )

    @endpoint
    async def HandleAsyncBooking(
        self, request: booking_pb2.BookingRequest, context: Context, request_id: str
    ) -> booking_pb2.BookingASyncResponse:
        """Queue the booking; returns once the broker has confirmed its first message."""
        await self._async.run(request_id, _dto(request_id, validated(request)))
        return booking_pb2.BookingASyncResponse(RequestID=request_id)


def _dto(request_id: str, request: booking_pb2.BookingRequest) -> BookingMsgDTO:
    return BookingMsgDTO(
        request_id=request_id,
        product_id=request.ProductID,
        count=request.Count,
        fault_inject=request.FaultInject,
    )
