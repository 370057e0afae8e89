"""Bad input is refused before any effect, with the right status and the request id.

The booking service runs on a free port with the real upstream services; each
refusal is checked at the caller (status and message) and behind it (no saga
begun, no order created).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from dto import MAX_COUNT
from main import BookingApp
from pb import booking_pb2
from tests.support.app_fixtures import Upstreams

METHODS = (
    "/pb.BookingService/HandleSyncBooking",
    "/pb.BookingService/HandleAsyncBooking",
    "/orchestrator.v1.SagaService/GetSaga",
    "/orchestrator.v1.SagaService/WatchSaga",
)
CORRUPT = b"\xff\xff\xff"
"""Not a protobuf message at all: a field tag whose varint never ends."""


@pytest.fixture
async def channel(booking_app: BookingApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{booking_app.server.port}") as channel:
        yield channel


async def refusal(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if hasattr(call, "__aiter__"):
            async for _ in call:  # type: ignore[attr-defined]
                pass
        else:
            await call  # type: ignore[misc]
    return caught.value


@pytest.mark.parametrize("method", METHODS)
async def test_an_undecodable_request_is_invalid_argument_naming_the_message_and_request_id(
    channel: grpc.aio.Channel, method: str
) -> None:
    raw = {"request_serializer": lambda body: body, "response_deserializer": lambda body: body}
    call = (
        channel.unary_stream(method, **raw)
        if method.endswith("WatchSaga")
        else channel.unary_unary(method, **raw)
    )

    error = await refusal(call(CORRUPT, metadata=(("x-request-id", "garbled-1"),), timeout=5))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert "is not a valid" in details and "request_id=garbled-1" in details


async def bookings(
    channel: grpc.aio.Channel, request: booking_pb2.BookingRequest, request_id: str
) -> list[grpc.aio.AioRpcError]:
    """The refusals of a sync and of an async booking of `request`."""
    errors = []
    for method in ("HandleSyncBooking", "HandleAsyncBooking"):
        call = channel.unary_unary(
            f"/pb.BookingService/{method}",
            request_serializer=booking_pb2.BookingRequest.SerializeToString,
            response_deserializer=lambda body: body,
        )
        errors.append(await refusal(call(request, metadata=(("x-request-id", request_id),))))
    return errors


async def test_a_count_above_what_a_payment_can_carry_is_refused_before_any_effect(
    channel: grpc.aio.Channel, booking_app: BookingApp, upstreams: Upstreams
) -> None:
    huge = booking_pb2.BookingRequest(ProductID=1, Count=2**62)

    errors = await bookings(channel, huge, "huge-1")

    for error in errors:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"Count must be at most {MAX_COUNT}" in (error.details() or "")
        assert "huge-1" in (error.details() or "")
    assert upstreams.order.ledger.count_orders("huge-1") == 0
    for facade in ("SyncBooking", "AsyncBooking"):
        assert await booking_app.orchestrator.store.get(facade, "huge-1") is None


@pytest.mark.parametrize("request_id", ["   ", " "])
async def test_a_request_id_of_white_space_only_is_invalid_argument(
    channel: grpc.aio.Channel, upstreams: Upstreams, request_id: str
) -> None:
    errors = await bookings(channel, booking_pb2.BookingRequest(ProductID=1), request_id)

    for error in errors:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "white space" in (error.details() or "")
    assert upstreams.order.ledger.count_orders(request_id) == 0
