"""Per-step compensation: completed steps are undone in reverse order, retried, never dropped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from orchestrator import (
    AsyncFacade,
    AsyncFacadeContext,
    BrokerSettings,
    Context,
    FailedPrecondition,
    InMemoryBroker,
    Orchestrator,
    RetryPolicy,
    Rollback,
    SagaFailed,
    SyncFacade,
)
from pb.booking_pb2 import BookingRequest, BookingSyncResponse

Ctx = Context[BookingRequest, BookingSyncResponse]
Flow = SyncFacade[BookingRequest, BookingSyncResponse]
QUICK = RetryPolicy(attempts=5, initial_backoff=0.001, max_backoff=0.002, any_error=True)


class Journal:
    """What the nodes and compensations did, in order."""

    def __init__(self) -> None:
        self.entries: list[str] = []

    def node(self, name: str, order_id: int = 0) -> object:
        async def do(request_id: str, ctx: Ctx) -> None:
            self.entries.append(name)
            if order_id:
                ctx.response.OrderID = order_id

        do.__name__ = name
        return do

    def undo(self, name: str) -> object:
        async def undo(request_id: str, ctx: Ctx) -> None:
            self.entries.append(f"undo {name} order={ctx.response.OrderID} rid={request_id}")

        return undo


async def decline(request_id: str, ctx: Ctx) -> None:
    raise FailedPrecondition("declined")


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker(BrokerSettings(redelivery_delay_seconds=0.001, delivery_limit=3))


@pytest.fixture
async def orchestrator(broker: InMemoryBroker) -> AsyncIterator[Orchestrator]:
    orchestrator = Orchestrator(broker)
    yield orchestrator
    await orchestrator.close()


async def fail_and_settle(orchestrator: Orchestrator, broker: InMemoryBroker, flow: Flow) -> None:
    orchestrator.register_sync_facade("Booking", flow)
    await orchestrator.start()
    with pytest.raises(SagaFailed):
        await flow.run("c1", BookingRequest(ProductID=1), BookingSyncResponse())
    await asyncio.wait_for(broker.join(), 10)


def metric(orchestrator: Orchestrator, name: str) -> float:
    labels = {"facade": "Booking", "kind": "sync"}
    return orchestrator.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_completed_steps_are_compensated_in_reverse_order_with_the_saga_state(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    journal = Journal()
    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(journal.node("reserve"), compensate=journal.undo("reserve"))  # type: ignore[arg-type]
        .use(journal.node("order", order_id=7), compensate=journal.undo("order"))  # type: ignore[arg-type]
        .use(decline, compensate=journal.undo("decline"))  # type: ignore[arg-type]
        .consume_rollback("cancel")
    )

    await fail_and_settle(orchestrator, broker, flow)

    assert journal.entries == [
        "reserve",
        "order",
        "undo order order=7 rid=c1",
        "undo reserve order=7 rid=c1",
    ]
    assert metric(orchestrator, "orchestrator_sagas_compensated_total") == 1


async def test_the_rollback_node_runs_after_the_compensations(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    journal = Journal()

    async def rollback_node(rollback: Rollback) -> None:
        journal.entries.append(f"rollback node after {rollback.completed_steps}")

    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(journal.node("order"), compensate=journal.undo("order"))  # type: ignore[arg-type]
        .use(journal.node("note"))  # type: ignore[arg-type]
        .use(decline)
        .consume_rollback("cancel", rollback_node)
    )

    await fail_and_settle(orchestrator, broker, flow)

    assert journal.entries[-2:] == [
        "undo order order=0 rid=c1",
        "rollback node after ['order', 'note']",
    ]


async def test_a_compensation_failing_three_times_then_succeeding_compensates_once(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    attempts = 0
    cancelled = 0

    async def cancel_order(request_id: str, ctx: Ctx) -> None:
        nonlocal attempts, cancelled
        attempts += 1
        if attempts <= 3:
            raise ConnectionError("order service down")
        cancelled += 1

    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(Journal().node("order"), compensate=cancel_order, compensate_retry=QUICK)  # type: ignore[arg-type]
        .use(decline)
        .consume_rollback("cancel")
    )

    await fail_and_settle(orchestrator, broker, flow)

    assert (attempts, cancelled) == (4, 1)
    assert metric(orchestrator, "orchestrator_sagas_compensated_total") == 1
    assert broker.dead_letters == []


async def test_a_compensation_that_always_fails_is_dead_lettered_as_compensation_failed(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    async def cancel_order(request_id: str, ctx: Ctx) -> None:
        raise ConnectionError("order service gone")

    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(Journal().node("order"), compensate=cancel_order, compensate_retry=QUICK)  # type: ignore[arg-type]
        .use(decline)
        .consume_rollback("cancel")
    )

    await fail_and_settle(orchestrator, broker, flow)

    [dead] = broker.dead_letters
    assert dead.topic == "cancel"
    assert dead.reason.startswith("COMPENSATION_FAILED at order")
    assert Rollback.model_validate_json(dead.body).request_id == "c1"
    assert metric(orchestrator, "orchestrator_sagas_compensation_failed_total") == 1
    assert metric(orchestrator, "orchestrator_sagas_compensated_total") == 0


async def test_compensations_need_a_rollback_topic(orchestrator: Orchestrator) -> None:
    journal = Journal()
    flow = Flow(request=BookingRequest, response=BookingSyncResponse).use(
        journal.node("order"), compensate=journal.undo("order")
    )  # type: ignore[arg-type]
    orchestrator.register_sync_facade("Booking", flow)

    with pytest.raises(ValueError, match="no rollback topic"):
        await orchestrator.start()


async def test_compensations_need_the_facade_message_types(orchestrator: Orchestrator) -> None:
    journal = Journal()
    flow: Flow = SyncFacade()
    flow.use(journal.node("order"), compensate=journal.undo("order"))  # type: ignore[arg-type]
    orchestrator.register_sync_facade("Booking", flow.consume_rollback("cancel"))

    with pytest.raises(TypeError, match=r"SyncFacade\[RequestMessage, ResponseMessage\]"):
        await orchestrator.start()


class OrderDTO(AsyncFacadeContext):
    order_id: int = 0


async def test_an_async_saga_compensates_its_completed_hops_with_the_dto(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    undone: list[int] = []

    async def create_order(dto: OrderDTO) -> OrderDTO:
        dto.order_id = 42
        return dto

    async def cancel_order(dto: OrderDTO) -> None:
        undone.append(dto.order_id)

    async def create_payment(dto: OrderDTO) -> OrderDTO:
        raise FailedPrecondition("declined")

    flow = AsyncFacade(dto=OrderDTO)
    flow.use("order", create_order, compensate=cancel_order).use("payment", create_payment)
    orchestrator.register_async_facade("AsyncBooking", flow)
    await orchestrator.start()
    await flow.run("c2", OrderDTO(request_id="c2"))
    await asyncio.wait_for(broker.join(), 10)

    assert undone == [42]
