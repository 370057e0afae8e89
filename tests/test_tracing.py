"""Optional OpenTelemetry tracing: one trace per saga, across steps and broker hops."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator import (
    AsyncFacade,
    AsyncFacadeContext,
    Context,
    FailedPrecondition,
    InMemoryBroker,
    Orchestrator,
    Rollback,
    SagaFailed,
    SyncFacade,
    TracingSettings,
    configure_tracing,
    step_metadata,
)
from pb.booking_pb2 import BookingRequest, BookingSyncResponse

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
