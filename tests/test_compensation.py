"""Per-step compensation: completed steps are undone in reverse order, retried, never dropped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from orchestrator.broker.memory import InMemoryBroker
from orchestrator.config import BrokerSettings
from orchestrator.context import Context
from orchestrator.dto import AsyncFacadeContext, Rollback
from orchestrator.errors import FailedPrecondition
from orchestrator.facade.async_ import AsyncFacade
from orchestrator.facade.sync import SyncFacade
from orchestrator.registry import Orchestrator
from orchestrator.retry import NO_RETRY, RetryPolicy
from orchestrator.store import CompensationState, SagaState
from orchestrator.testing import SagaKit, SagaRun, assert_saga
from pb.booking_pb2 import BookingRequest, BookingSyncResponse

Ctx = Context[BookingRequest, BookingSyncResponse]
Flow = SyncFacade[BookingRequest, BookingSyncResponse]
QUICK = RetryPolicy(attempts=5, initial_backoff=0.001, max_backoff=0.002, any_error=True)
BOUND = 10.0
"""Seconds any single wait in these tests may take before it fails."""


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
async def kits() -> AsyncIterator[list[SagaKit]]:
    """The test kits a test started; closed after it."""
    started: list[SagaKit] = []
    yield started
    for kit in started:
        await kit.close()


async def fail_and_settle(kits: list[SagaKit], flow: Flow) -> tuple[SagaKit, SagaRun]:
    """Register `flow` as Booking on a kit, run saga c1 to its failure, and wait until it and
    its rollback message are done."""
    kit = SagaKit(
        lambda orchestrator: orchestrator.register_sync_facade("Booking", flow),
        broker=BrokerSettings(redelivery_delay_seconds=0.001, delivery_limit=3),
        timeout=BOUND,
    )
    kits.append(kit)
    await kit.start()
    run = await kit.run("Booking", "c1", BookingRequest(ProductID=1))
    assert run.failure is not None
    async with asyncio.timeout(BOUND):
        await kit.broker.join()
    return kit, run


@pytest.fixture
async def orchestrator() -> AsyncIterator[Orchestrator]:
    orchestrator = Orchestrator(InMemoryBroker())
    yield orchestrator
    await orchestrator.close()


def metric(orchestrator: Orchestrator, name: str) -> float:
    labels = {"facade": "Booking", "kind": "sync"}
    return orchestrator.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_completed_steps_are_compensated_in_reverse_order_with_the_saga_state(
    kits: list[SagaKit],
) -> None:
    journal = Journal()
    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(journal.node("reserve"), compensate=journal.undo("reserve"))  # type: ignore[arg-type]
        .use(journal.node("order", order_id=7), compensate=journal.undo("order"))  # type: ignore[arg-type]
        .use(decline, compensate=journal.undo("decline"))  # type: ignore[arg-type]
        .consume_rollback("cancel")
    )

    kit, _ = await fail_and_settle(kits, flow)

    assert journal.entries == [
        "reserve",
        "order",
        "undo order order=7 rid=c1",
        "undo reserve order=7 rid=c1",
    ]
    assert metric(kit.orchestrator, "orchestrator_sagas_compensated_total") == 1


async def test_the_journal_records_which_steps_were_undone(
    kits: list[SagaKit],
) -> None:
    journal = Journal()
    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(journal.node("reserve"), compensate=journal.undo("reserve"))  # type: ignore[arg-type]
        .use(decline)
        .consume_rollback("cancel")
    )

    _, run = await fail_and_settle(kits, flow)
    saga = run.record

    assert_saga(saga, state=SagaState.COMPENSATED, failed="decline", compensated=["reserve"])
    assert [(step.name, step.compensation) for step in saga.steps] == [
        ("reserve", CompensationState.DONE),
        ("decline", CompensationState.NONE),
    ]
    assert saga.steps[0].compensated_at is not None


async def test_a_step_that_may_have_taken_effect_before_failing_is_compensated_too(
    kits: list[SagaKit],
) -> None:
    journal = Journal()

    async def lost_answer(request_id: str, ctx: Ctx) -> None:
        journal.entries.append("pay")
        raise TimeoutError  # UNAVAILABLE: the upstream may have applied it

    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(journal.node("order"), compensate=journal.undo("order"))  # type: ignore[arg-type]
        .use(lost_answer, name="pay", retry=NO_RETRY, compensate=journal.undo("pay"))  # type: ignore[arg-type]
        .consume_rollback("cancel")
    )

    _, run = await fail_and_settle(kits, flow)
    saga = run.record

    assert journal.entries == [
        "order",
        "pay",
        "undo pay order=0 rid=c1",
        "undo order order=0 rid=c1",
    ]
    assert [step.compensation for step in saga.steps] == [CompensationState.DONE] * 2


async def test_the_rollback_node_runs_after_the_compensations(
    kits: list[SagaKit],
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

    await fail_and_settle(kits, flow)

    assert journal.entries[-2:] == [
        "undo order order=0 rid=c1",
        "rollback node after ['order', 'note']",
    ]


async def test_a_compensation_failing_three_times_then_succeeding_compensates_once(
    kits: list[SagaKit],
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

    kit, _ = await fail_and_settle(kits, flow)

    assert (attempts, cancelled) == (4, 1)
    assert metric(kit.orchestrator, "orchestrator_sagas_compensated_total") == 1
    assert kit.broker.dead_letters == []


async def test_a_compensation_that_always_fails_is_dead_lettered_as_compensation_failed(
    kits: list[SagaKit],
) -> None:
    async def cancel_order(request_id: str, ctx: Ctx) -> None:
        raise ConnectionError("order service gone")

    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(Journal().node("order"), compensate=cancel_order, compensate_retry=QUICK)  # type: ignore[arg-type]
        .use(decline)
        .consume_rollback("cancel")
    )

    kit, _ = await fail_and_settle(kits, flow)

    [dead] = kit.broker.dead_letters
    assert dead.topic == "cancel"
    assert dead.reason.startswith("COMPENSATION_FAILED: compensation of order failed: ")
    assert json.loads(dead.body) == {"facade": "Booking", "request_id": "c1"}
    assert metric(kit.orchestrator, "orchestrator_sagas_compensation_failed_total") == 1
    assert metric(kit.orchestrator, "orchestrator_sagas_compensated_total") == 0


async def test_compensations_need_a_rollback_topic(orchestrator: Orchestrator) -> None:
    journal = Journal()
    flow = Flow(request=BookingRequest, response=BookingSyncResponse).use(
        journal.node("order"),  # type: ignore[arg-type]
        compensate=journal.undo("order"),  # type: ignore[arg-type]
    )

    with pytest.raises(ValueError, match=r"need a rollback topic .* consume_rollback\(topic\)"):
        orchestrator.register_sync_facade("Booking", flow)


def test_a_sync_facade_is_refused_without_protobuf_message_types() -> None:
    with pytest.raises(TypeError, match="request must be a protobuf message class"):
        SyncFacade(request=dict, response=BookingSyncResponse)  # type: ignore[type-var]


class OrderDTO(AsyncFacadeContext):
    order_id: int = 0


async def test_an_async_saga_compensates_its_completed_hops_with_the_dto() -> None:
    undone: list[int] = []

    async def create_order(dto: OrderDTO) -> OrderDTO:
        dto.order_id = 42
        return dto

    async def cancel_order(dto: OrderDTO) -> None:
        undone.append(dto.order_id)

    async def create_payment(dto: OrderDTO) -> OrderDTO:
        raise FailedPrecondition("declined")

    def register(orchestrator: Orchestrator) -> None:
        flow = AsyncFacade(dto=OrderDTO)
        flow.use("order", create_order, compensate=cancel_order).use("payment", create_payment)
        orchestrator.register_async_facade("AsyncBooking", flow.consume_rollback("cancel"))

    async with SagaKit(register, timeout=BOUND) as kit:
        run = await kit.run("AsyncBooking", "c2", OrderDTO(request_id="c2"))

    assert undone == [42]
    assert_saga(
        run, state=SagaState.COMPENSATED, failed="create_payment", compensated=["create_order"]
    )


async def test_an_async_saga_with_nothing_to_undo_is_compensated_without_a_rollback_message(
    orchestrator: Orchestrator,
) -> None:
    broker = orchestrator.broker
    assert isinstance(broker, InMemoryBroker)
    published: list[str] = []
    real_publish = broker.publish

    async def spying(topic: str, body: bytes, **kwargs: object) -> None:
        published.append(topic)
        await real_publish(topic, body, **kwargs)  # type: ignore[arg-type]

    async def create_payment(dto: OrderDTO) -> OrderDTO:
        raise FailedPrecondition("declined")

    flow = AsyncFacade(dto=OrderDTO).use("payment", create_payment)
    orchestrator.register_async_facade("AsyncBooking", flow)
    await orchestrator.start()
    broker.publish = spying  # type: ignore[method-assign]
    await flow.run("c3", OrderDTO(request_id="c3"))
    async with asyncio.timeout(BOUND):
        saga = await flow.wait_for("c3")
        await broker.join()

    assert (saga.state, saga.error_code) == (SagaState.COMPENSATED, "FAILED_PRECONDITION")
    assert published == ["payment"]
    assert broker.dead_letters == []


async def test_an_async_facade_with_compensations_needs_a_rollback_topic(
    orchestrator: Orchestrator,
) -> None:
    async def create_order(dto: OrderDTO) -> OrderDTO:
        return dto

    async def cancel_order(dto: OrderDTO) -> None:
        pass

    flow = AsyncFacade(dto=OrderDTO).use("order", create_order, compensate=cancel_order)

    with pytest.raises(ValueError, match="need a rollback topic"):
        orchestrator.register_async_facade("AsyncBooking", flow)
