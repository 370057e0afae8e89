"""Optional OpenTelemetry tracing: one trace per saga, across steps and broker hops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dto import BookingMsgDTO
from facade import ASYNC_BOOKING, SYNC_BOOKING, THROTTLING_BOOKING
from handler import BookingHandler
from orchestrator import (
    AsyncFacade,
    AsyncFacadeContext,
    Context,
    FailedPrecondition,
    Orchestrator,
    Rollback,
    SyncFacade,
    ThrottlingFacade,
    step_metadata,
)
from orchestrator.broker import InMemoryBroker
from orchestrator.config import GrpcSettings, TracingSettings
from orchestrator.errors import SagaFailed
from orchestrator.server import OrchestratorServer
from orchestrator.service import GrpcService
from orchestrator.tracing import configure_tracing
from pb import booking_pb2_grpc
from pb.booking_pb2 import BookingRequest, BookingSyncResponse
from tests.support.app_fixtures import eventually

Ctx = Context[BookingRequest, BookingSyncResponse]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    configure_tracing(TracingSettings(enabled=True), span_processor=SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        configure_tracing(TracingSettings(enabled=False))


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


async def test_a_sync_saga_is_one_trace_with_a_span_per_step(
    spans: InMemorySpanExporter,
) -> None:
    seen_metadata: list[tuple[tuple[str, str], ...]] = []

    async def create_order(request_id: str, ctx: Ctx) -> None:
        seen_metadata.append(step_metadata())

    async def create_payment(request_id: str, ctx: Ctx) -> None:
        pass

    orchestrator = Orchestrator(InMemoryBroker())
    flow = (
        SyncFacade(request=BookingRequest, response=BookingSyncResponse)
        .use(create_order)
        .use(create_payment)
    )
    orchestrator.register_sync_facade("Booking", flow)
    await orchestrator.start()
    await flow.run("t1", BookingRequest(ProductID=1), BookingSyncResponse())
    await orchestrator.close()

    named = by_name(spans)
    root, order, payment = (
        named["saga Booking"],
        named["step create_order"],
        named["step create_payment"],
    )
    assert root.attributes is not None and root.attributes["saga.request_id"] == "t1"
    assert {order.context.trace_id, payment.context.trace_id} == {root.context.trace_id}
    assert order.parent is not None and order.parent.span_id == root.context.span_id
    [metadata] = seen_metadata
    assert dict(metadata)["x-idempotency-key"] == "Booking:t1:create_order"
    traceparent = dict(metadata)["traceparent"]
    assert f"{order.context.trace_id:032x}" in traceparent


class Dto(AsyncFacadeContext):
    fail: bool = False


async def test_an_async_saga_is_one_trace_across_its_hops_and_its_rollback(
    spans: InMemorySpanExporter,
) -> None:
    rolled_back = asyncio.Event()

    async def first(dto: Dto) -> Dto:
        return dto

    async def second(dto: Dto) -> Dto:
        raise FailedPrecondition("declined")

    async def undo(rollback: Rollback) -> None:
        rolled_back.set()

    orchestrator = Orchestrator(InMemoryBroker())
    flow = AsyncFacade(dto=Dto).use("first", first).use("second", second)
    orchestrator.register_async_facade("Async", flow.consume_rollback("undo", undo))
    await orchestrator.start()
    await flow.run("t2", Dto(request_id="t2"))
    async with asyncio.timeout(5):
        await rolled_back.wait()
        await flow.wait_for("t2")
    await orchestrator.close()

    named = by_name(spans)
    root = named["saga Async"]
    chain = [named["step first"], named["step second"], named["rollback Async"]]
    assert {span.context.trace_id for span in chain} == {root.context.trace_id}
    parents = [span.parent.span_id if span.parent else None for span in chain]
    assert parents == [root.context.span_id, chain[0].context.span_id, chain[1].context.span_id]


async def test_without_tracing_no_trace_context_is_sent() -> None:
    seen_metadata: list[tuple[tuple[str, str], ...]] = []

    async def create_order(request_id: str, ctx: Ctx) -> None:
        seen_metadata.append(step_metadata())

    orchestrator = Orchestrator(InMemoryBroker())
    flow = SyncFacade(request=BookingRequest, response=BookingSyncResponse).use(create_order)
    orchestrator.register_sync_facade("Booking", flow)
    await orchestrator.start()
    try:
        await flow.run("t3", BookingRequest(), BookingSyncResponse())
    finally:
        await orchestrator.close()

    assert seen_metadata == [
        (("x-request-id", "t3"), ("x-idempotency-key", "Booking:t3:create_order")),
    ]


async def test_a_failed_step_is_still_recorded(spans: InMemorySpanExporter) -> None:
    async def decline(request_id: str, ctx: Ctx) -> None:
        raise FailedPrecondition("no")

    orchestrator = Orchestrator(InMemoryBroker())
    flow = SyncFacade(request=BookingRequest, response=BookingSyncResponse).use(decline)
    orchestrator.register_sync_facade("Booking", flow)
    await orchestrator.start()
    with pytest.raises(SagaFailed):
        await flow.run("t4", BookingRequest(), BookingSyncResponse())
    await orchestrator.close()

    step = by_name(spans)["step decline"]
    assert not step.status.is_ok


# A caller's span, as a W3C traceparent (the example of the Trace Context spec).
CALLER_TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN_ID = 0xB7AD6B7169203331
CALLER_METADATA = (("traceparent", f"00-{CALLER_TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"),)


@pytest.fixture
async def booking(
    spans: InMemorySpanExporter,
) -> AsyncIterator[booking_pb2_grpc.BookingServiceStub]:
    """pb.BookingService (the example's handler) served on a free port, over trivial facades."""

    async def create_order(request_id: str, ctx: Ctx) -> None:
        ctx.response.OrderID = 1

    async def order_hop(dto: BookingMsgDTO) -> BookingMsgDTO:
        return dto

    async def payment_hop(dto: BookingMsgDTO) -> BookingMsgDTO:
        return dto

    orchestrator = Orchestrator(InMemoryBroker())
    sync_flow = SyncFacade(request=BookingRequest, response=BookingSyncResponse).use(create_order)
    orchestrator.register_sync_facade(SYNC_BOOKING, sync_flow)
    async_flow = AsyncFacade(dto=BookingMsgDTO).use("order", order_hop).use("pay", payment_hop)
    orchestrator.register_async_facade(ASYNC_BOOKING, async_flow)
    throttled = ThrottlingFacade(dto=BookingMsgDTO).use("t.order", order_hop)
    orchestrator.register_throttling_facade(THROTTLING_BOOKING, throttled.use("t.pay", payment_hop))
    service = GrpcService(
        "pb.BookingService",
        booking_pb2_grpc.add_BookingServiceServicer_to_server,
        BookingHandler(orchestrator),
    )
    server = OrchestratorServer(orchestrator, GrpcSettings(host="127.0.0.1", port=0), [service])
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield booking_pb2_grpc.BookingServiceStub(channel)
    finally:
        await server.stop(0)


async def test_a_callers_traceparent_is_the_parent_of_a_sync_saga(
    booking: booking_pb2_grpc.BookingServiceStub, spans: InMemorySpanExporter
) -> None:
    await booking.HandleSyncBooking(
        BookingRequest(ProductID=1),
        metadata=(("x-request-id", "traced-sync"), *CALLER_METADATA),
        timeout=10,
    )

    named = by_name(spans)
    root, step = named[f"saga {SYNC_BOOKING}"], named["step create_order"]
    assert root.parent is not None
    assert (root.parent.trace_id, root.parent.span_id) == (CALLER_TRACE_ID, CALLER_SPAN_ID)
    assert root.parent.is_remote
    assert {root.context.trace_id, step.context.trace_id} == {CALLER_TRACE_ID}


async def test_a_callers_traceparent_carries_across_the_async_hops(
    booking: booking_pb2_grpc.BookingServiceStub, spans: InMemorySpanExporter
) -> None:
    await booking.HandleAsyncBooking(
        BookingRequest(ProductID=1),
        metadata=(("x-request-id", "traced-async"), *CALLER_METADATA),
        timeout=10,
    )

    async def last_hop_ended() -> bool:
        return "step payment_hop" in by_name(spans)

    await eventually(last_hop_ended, within=5)

    named = by_name(spans)
    root = named[f"saga {ASYNC_BOOKING}"]
    hops = [named["step order_hop"], named["step payment_hop"]]
    assert root.parent is not None
    assert (root.parent.trace_id, root.parent.span_id) == (CALLER_TRACE_ID, CALLER_SPAN_ID)
    assert {span.context.trace_id for span in [root, *hops]} == {CALLER_TRACE_ID}
    assert [hop.parent.span_id if hop.parent else None for hop in hops] == [
        root.context.span_id,
        hops[0].context.span_id,
    ]


async def test_without_a_traceparent_a_saga_starts_a_trace_of_its_own(
    booking: booking_pb2_grpc.BookingServiceStub, spans: InMemorySpanExporter
) -> None:
    await booking.HandleSyncBooking(
        BookingRequest(ProductID=1), metadata=(("x-request-id", "untraced"),), timeout=10
    )

    root = by_name(spans)[f"saga {SYNC_BOOKING}"]
    assert root.parent is None
    assert root.context.trace_id != CALLER_TRACE_ID
