"""HandleSyncBooking end to end: real gRPC servers on free ports, real upstream services."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import grpc
import pytest

from main import BookingApp
from main import running_app as run_booking_app
from pb import booking_pb2, booking_pb2_grpc, order_pb2, payment_pb2
from tests.support.app_fixtures import Upstreams, app_settings, eventually
from upstream.server import serve_upstream

if TYPE_CHECKING:
    BookingStub = booking_pb2_grpc.BookingServiceAsyncStub


def request_id() -> str:
    return f"test-{uuid.uuid4()}"


async def book(
    booking: BookingStub, rid: str, *, fault: bool = False, count: int = 0
) -> booking_pb2.BookingSyncResponse:
    return await booking.HandleSyncBooking(
        booking_pb2.BookingRequest(ProductID=7, Count=count, FaultInject=fault),
        metadata=(("x-request-id", rid),),
        timeout=10,
    )


async def test_a_booking_creates_an_order_and_a_payment(
    booking: BookingStub, upstreams: Upstreams
) -> None:
    rid = request_id()
    response = await book(booking, rid, count=3)

    order = await upstreams.order_of(rid)
    payment = await upstreams.payment_of(rid)
    assert order is not None and payment is not None
    assert response.RequestID == rid
    assert response.OrderID == order.OrderID
    assert response.PaymentID == payment.PaymentID
    assert order.Status == order_pb2.CREATED and order.Count == 3
    assert payment.Status == payment_pb2.PAID and payment.OrderID == order.OrderID


async def test_count_zero_books_one(booking: BookingStub, upstreams: Upstreams) -> None:
    rid = request_id()
    await book(booking, rid, count=0)

    order = await upstreams.order_of(rid)
    assert order is not None and order.Count == 1


async def test_the_same_request_id_books_once(booking: BookingStub, upstreams: Upstreams) -> None:
    rid = request_id()
    first = await book(booking, rid)
    second = await book(booking, rid)

    assert (first.OrderID, first.PaymentID) == (second.OrderID, second.PaymentID)


async def test_fault_inject_fails_with_failed_precondition_naming_the_request_id(
    booking: BookingStub,
) -> None:
    rid = request_id()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await book(booking, rid, fault=True)

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rid in (failure.value.details() or "")
    assert "create_payment" in (failure.value.details() or "")


async def test_fault_inject_cancels_the_order_and_leaves_no_payment(
    booking: BookingStub, upstreams: Upstreams
) -> None:
    rid = request_id()
    with pytest.raises(grpc.aio.AioRpcError):
        await book(booking, rid, fault=True)

    async def cancelled() -> bool:
        order = await upstreams.order_of(rid)
        return order is not None and order.Status == order_pb2.CANCELLED

    await eventually(cancelled)
    assert await upstreams.payment_of(rid) is None


async def test_payment_service_down_fails_with_unavailable_and_cancels_the_order(
    booking: BookingStub, upstreams: Upstreams
) -> None:
    await upstreams.payment.stop(None)
    rid = request_id()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await book(booking, rid)

    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert rid in (failure.value.details() or "")

    async def cancelled() -> bool:
        order = await upstreams.order_of(rid)
        return order is not None and order.Status == order_pb2.CANCELLED

    await eventually(cancelled)


async def test_order_service_down_fails_with_unavailable_and_creates_nothing(
    booking_app: BookingApp, booking: BookingStub, upstreams: Upstreams
) -> None:
    await upstreams.order.stop(None)
    rid = request_id()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await book(booking, rid)

    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await upstreams.payment_of(rid) is None


async def test_a_caller_deadline_bounds_the_saga_and_its_work_is_undone(
    upstreams: Upstreams,
) -> None:
    slow_payment = await serve_upstream("payment", port=0, latency_ms=3000)
    slow = Upstreams(upstreams.order, slow_payment, upstreams.order_stub, upstreams.payment_stub)
    try:
        async with (
            run_booking_app(app_settings(slow)) as app,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel,
        ):
            stub = booking_pb2_grpc.BookingServiceStub(channel)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.HandleSyncBooking(
                    booking_pb2.BookingRequest(ProductID=1),
                    metadata=(("x-request-id", "deadline-1"),),
                    timeout=0.6,
                )
            elapsed = loop.time() - started

            assert failure.value.code() in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNAVAILABLE,
            )
            assert elapsed < 1.5

            async def cancelled() -> bool:
                order = await upstreams.order_of("deadline-1")
                return order is not None and order.Status == order_pb2.CANCELLED

            await eventually(cancelled)
    finally:
        await slow_payment.stop(None)


async def test_lost_upstream_answers_are_retried_without_a_double_order_or_payment(
    upstreams: Upstreams,
) -> None:
    """A fifth of creates apply and then answer UNAVAILABLE: retries find what was applied."""
    order = await serve_upstream("order", port=0, fail_after_apply_rate=0.2)
    payment = await serve_upstream("payment", port=0, fail_after_apply_rate=0.2)
    lossy = Upstreams(order, payment, upstreams.order_stub, upstreams.payment_stub)
    try:
        async with (
            run_booking_app(app_settings(lossy)) as app,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel,
        ):
            stub = booking_pb2_grpc.BookingServiceStub(channel)

            async def attempt(rid: str) -> bool:
                try:
                    await book(stub, rid)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    return False
                return True

            rids = [f"lossy-{i}" for i in range(100)]
            booked = await asyncio.gather(*(attempt(rid) for rid in rids))
            await app.orchestrator.broker.join()  # type: ignore[attr-defined]

        assert sum(booked) >= 90  # three attempts: 0.2**3 of steps fail for good
        for rid, ok in zip(rids, booked, strict=True):
            assert order.ledger.count_orders(rid) == 1
            assert payment.ledger.count_payments(rid) <= 1
            placed = order.ledger.latest_order_of(rid)
            paid = payment.ledger.latest_payment_of(rid)
            assert placed is not None
            if ok:
                assert placed.status == "CREATED" and paid is not None and paid.status == "PAID"
            else:
                assert placed.status == "CANCELLED"
                assert paid is None or paid.status == "REFUNDED"
    finally:
        await order.stop(None)
        await payment.stop(None)
