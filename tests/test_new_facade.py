"""A new three-step facade, registered in code without touching orchestrator/.

This is the README's "Adding a facade" in miniature: a stock-reservation node
joins the example's order and payment nodes, a rollback node releases the
stock and undoes the booking, and a handler serves it over gRPC. It is tested
as an application's own facade would be, with the test kit
(`orchestrator.testing`) against the real Order and Payment services: each
saga judged from their ledgers, the stock and its record.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest

from handler.booking import validated
from node import Upstreams, cancel_booking_node, create_order_sync_node, create_payment_sync_node
from orchestrator.config import GrpcSettings
from orchestrator.context import Context
from orchestrator.dto import Rollback
from orchestrator.endpoint import endpoint
from orchestrator.errors import FailedPrecondition
from orchestrator.facade.sync import SyncFacade
from orchestrator.registry import Orchestrator
from orchestrator.server import OrchestratorServer
from orchestrator.service import GrpcService
from orchestrator.testing import Registration, SagaKit, assert_saga
from pb import booking_pb2, booking_pb2_grpc
from tests.support.app_fixtures import Upstreams as RunningUpstreams
from upstream.ledger import CANCELLED, CREATED, PAID

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
def stock() -> Stock:
    return Stock(available=5)


@pytest.fixture
async def clients(upstreams: RunningUpstreams) -> AsyncIterator[Upstreams]:
    clients = Upstreams.connect(
        order_address=upstreams.order.target,
        payment_address=upstreams.payment.target,
        timeout_seconds=2,
    )
    yield clients
    await clients.close()


@pytest.fixture
def orchestrator_facades(clients: Upstreams, stock: Stock) -> Sequence[Registration]:
    return [lambda orchestrator: register_gift_booking(orchestrator, clients, stock)]


def ledgers(upstreams: RunningUpstreams, request_id: str) -> tuple[list[str], list[str]]:
    """The statuses of `request_id`'s orders and payments, oldest first."""
    orders = [order.status for order in upstreams.order.ledger.orders_of(request_id)]
    payments = [payment.status for payment in upstreams.payment.ledger.payments_of(request_id)]
    return orders, payments


async def test_the_new_facade_runs_its_three_steps(
    orchestrator_kit: SagaKit, upstreams: RunningUpstreams, stock: Stock
) -> None:
    run = await orchestrator_kit.run("GiftBooking", "gift-1", Request(ProductID=1, Count=2))

    assert_saga(run, state="COMPLETED", done=["reserve_stock", "create_order", "create_payment"])
    assert stock.reserved == {"gift-1": 2} and stock.available == 3
    assert ledgers(upstreams, "gift-1") == ([CREATED], [PAID])
    assert run.response is not None and run.response.PaymentID > 0


async def test_the_new_facade_rolls_back_all_three_steps(
    orchestrator_kit: SagaKit, upstreams: RunningUpstreams, stock: Stock
) -> None:
    run = await orchestrator_kit.run(
        "GiftBooking", "gift-2", Request(ProductID=1, Count=2, FaultInject=True)
    )

    assert run.failure is not None and run.failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert_saga(run, state="COMPENSATED", failed="create_payment")
    assert ledgers(upstreams, "gift-2") == ([CANCELLED], [])
    assert not stock.reserved and stock.available == 5


async def test_the_new_facade_refuses_what_it_cannot_reserve(
    orchestrator_kit: SagaKit, upstreams: RunningUpstreams, stock: Stock
) -> None:
    run = await orchestrator_kit.run("GiftBooking", "gift-3", Request(ProductID=1, Count=9))

    assert run.failure is not None and "only 5 in stock" in str(run.failure)
    assert_saga(run, state="COMPENSATED", failed="reserve_stock", done=[])
    assert ledgers(upstreams, "gift-3") == ([], [])
    assert stock.available == 5


async def test_an_order_whose_answer_is_lost_is_cancelled_by_the_rollback_node(
    orchestrator_kit: SagaKit, upstreams: RunningUpstreams, stock: Stock
) -> None:
    orchestrator_kit.faults.lose_answer("create_order")

    run = await orchestrator_kit.run("GiftBooking", "gift-4", Request(ProductID=1, Count=1))

    # Each retry got the same order back (its idempotency key); the rollback node undid it.
    assert_saga(run, state="COMPENSATED", failed="create_order", error_code="UNAVAILABLE")
    assert ledgers(upstreams, "gift-4") == ([CANCELLED], [])
    assert stock.available == 5


async def test_a_rollback_node_failing_twice_still_releases_the_stock_and_the_order(
    orchestrator_kit: SagaKit, upstreams: RunningUpstreams, stock: Stock
) -> None:
    failing = orchestrator_kit.faults.fail_compensation("rollback", times=2)

    run = await orchestrator_kit.run(
        "GiftBooking", "gift-7", Request(ProductID=1, Count=3, FaultInject=True)
    )

    assert_saga(run, state="COMPENSATED", failed="create_payment")
    assert failing.hits == 2
    assert ledgers(upstreams, "gift-7") == ([CANCELLED], [])
    assert stock.available == 5


async def test_the_new_facade_is_served_over_grpc_by_its_handler(
    orchestrator_kit: SagaKit, upstreams: RunningUpstreams
) -> None:
    orchestrator = orchestrator_kit.orchestrator
    service = GrpcService(
        "pb.BookingService",
        booking_pb2_grpc.add_BookingServiceServicer_to_server,
        GiftHandler(orchestrator),
    )
    server = OrchestratorServer(orchestrator, GrpcSettings(host="127.0.0.1", port=0), [service])
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = booking_pb2_grpc.BookingServiceStub(channel)
            response = await stub.HandleSyncBooking(
                Request(ProductID=1, Count=1), metadata=(("x-request-id", "gift-5"),), timeout=10
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.HandleSyncBooking(
                    Request(ProductID=1, Count=9),
                    metadata=(("x-request-id", "gift-6"),),
                    timeout=10,
                )
    finally:
        await server.stop(0)

    assert response.RequestID == "gift-5" and response.OrderID > 0
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert_saga(await orchestrator_kit.saga("GiftBooking", "gift-5"), state="COMPLETED")
