"""A new three-step facade, registered in code without touching orchestrator/.

This is the README's "Adding a facade" in miniature: a stock-reservation node
joins the example's order and payment nodes, a rollback node releases the
stock and undoes the booking, and a handler serves it over gRPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from handler.booking import validated
from node import Upstreams, cancel_booking_node, create_order_sync_node, create_payment_sync_node
from orchestrator import Context, FailedPrecondition, Orchestrator, Rollback, SyncFacade, endpoint
from orchestrator.broker import InMemoryBroker
from orchestrator.config import GrpcSettings
from orchestrator.server import OrchestratorServer
from orchestrator.service import GrpcService
from pb import booking_pb2, booking_pb2_grpc, order_pb2
from tests.support.app_fixtures import Upstreams as RunningUpstreams
from tests.support.app_fixtures import eventually

Request = booking_pb2.BookingRequest
Response = booking_pb2.BookingSyncResponse


class Stock:
    """A tiny inventory: reservations by request id."""

    def __init__(self, available: int) -> None:
        self.available = available
        self.reserved: dict[str, int] = {}

    def reserve_node(self) -> Any:
        async def reserve_stock(request_id: str, ctx: Context[Request, Response]) -> None:
            if request_id in self.reserved:  # a retried step reserves once
                return
            if ctx.request.Count > self.available:
                raise FailedPrecondition(f"only {self.available} in stock")
            self.available -= ctx.request.Count
            self.reserved[request_id] = ctx.request.Count

        return reserve_stock

    def release(self, request_id: str) -> None:
        self.available += self.reserved.pop(request_id, 0)


def register_gift_booking(orchestrator: Orchestrator, upstreams: Upstreams, stock: Stock) -> None:
    """The new facade: reserve stock, create the order, take the payment."""
    undo_booking = cancel_booking_node(upstreams)

    async def release_and_cancel(rollback: Rollback) -> None:
        stock.release(rollback.request_id)
        await undo_booking(rollback)

    flow = SyncFacade(request=Request, response=Response)
    flow.use(stock.reserve_node())
    flow.use(create_order_sync_node(upstreams)).use(create_payment_sync_node(upstreams))
    flow.consume_rollback("cancel_gift_booking", release_and_cancel)
    orchestrator.register_sync_facade("GiftBooking", flow)


class GiftHandler(booking_pb2_grpc.BookingServiceServicer):
    """Serves HandleSyncBooking through the GiftBooking facade."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self._flow: SyncFacade[Request, Response] = orchestrator.get_sync_facade("GiftBooking")

    @endpoint
    async def HandleSyncBooking(self, request: Request, context: Any, request_id: str) -> Response:
        return await self._flow.run(request_id, validated(request), Response(RequestID=request_id))


@pytest.fixture
async def gift_service(
    upstreams: RunningUpstreams,
) -> AsyncIterator[tuple[booking_pb2_grpc.BookingServiceAsyncStub, Stock]]:
    stock = Stock(available=5)
    clients = Upstreams.connect(
        order_address=upstreams.order.target,
        payment_address=upstreams.payment.target,
        timeout_seconds=2,
    )
    orchestrator = Orchestrator(InMemoryBroker())
    register_gift_booking(orchestrator, clients, stock)
    service = GrpcService(
        "pb.BookingService",
        booking_pb2_grpc.add_BookingServiceServicer_to_server,
        GiftHandler(orchestrator),
    )
    server = OrchestratorServer(orchestrator, GrpcSettings(host="127.0.0.1", port=0), [service])
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield booking_pb2_grpc.BookingServiceStub(channel), stock
    finally:
        await server.stop(0)
        await clients.close()


async def test_the_new_facade_runs_its_three_steps(
    gift_service: tuple[Any, Stock], upstreams: RunningUpstreams
) -> None:
    stub, stock = gift_service
    response = await stub.HandleSyncBooking(
        Request(ProductID=1, Count=2), metadata=(("x-request-id", "gift-1"),), timeout=10
    )

    assert stock.reserved == {"gift-1": 2} and stock.available == 3
    order = await upstreams.order_of("gift-1")
    assert order is not None and order.OrderID == response.OrderID
    assert response.PaymentID > 0


async def test_the_new_facade_rolls_back_all_three_steps(
    gift_service: tuple[Any, Stock], upstreams: RunningUpstreams
) -> None:
    stub, stock = gift_service
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.HandleSyncBooking(
            Request(ProductID=1, Count=2, FaultInject=True),
            metadata=(("x-request-id", "gift-2"),),
            timeout=10,
        )
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    async def undone() -> bool:
        order = await upstreams.order_of("gift-2")
        return order is not None and order.Status == order_pb2.CANCELLED and not stock.reserved

    await eventually(undone)
    assert stock.available == 5


async def test_the_new_facade_refuses_what_it_cannot_reserve(
    gift_service: tuple[Any, Stock], upstreams: RunningUpstreams
) -> None:
    stub, stock = gift_service
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.HandleSyncBooking(
            Request(ProductID=1, Count=9), metadata=(("x-request-id", "gift-3"),), timeout=10
        )

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "only 5 in stock" in (failure.value.details() or "")
    assert await upstreams.order_of("gift-3") is None
    assert stock.available == 5
