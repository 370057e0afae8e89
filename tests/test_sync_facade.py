"""SyncFacade: nodes run in order over a Context; a raising node rolls the saga back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from orchestrator import (
    BrokerSettings,
    BrokerUnavailable,
    Context,
    FailedPrecondition,
    InMemoryBroker,
    InvalidArgument,
    Orchestrator,
    Rollback,
    SagaFailed,
    SyncFacade,
)
from pb.booking_pb2 import BookingRequest, BookingSyncResponse

Ctx = Context[BookingRequest, BookingSyncResponse]
Flow = SyncFacade[BookingRequest, BookingSyncResponse]


class Recorder:
    """Collects the rollbacks a rollback node receives."""

    def __init__(self, failures: int = 0) -> None:
        self.rollbacks: list[Rollback] = []
        self.attempts = 0
        self._failures = failures
        self.received = asyncio.Event()

    async def __call__(self, rollback: Rollback) -> None:
        self.attempts += 1
        if self.attempts <= self._failures:
            raise RuntimeError("upstream still down")
        self.rollbacks.append(rollback)
        self.received.set()


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker(BrokerSettings(redelivery_delay_seconds=0.001, delivery_limit=4))


@pytest.fixture
async def orchestrator(broker: InMemoryBroker) -> AsyncIterator[Orchestrator]:
    orchestrator = Orchestrator(broker)
    yield orchestrator
    await orchestrator.close()


async def set_order(request_id: str, ctx: Ctx) -> None:
    ctx.response.OrderID = ctx.request.ProductID * 10


async def set_payment(request_id: str, ctx: Ctx) -> None:
    ctx.response.PaymentID = ctx.response.OrderID + 1


async def decline(request_id: str, ctx: Ctx) -> None:
    raise FailedPrecondition("payment declined")


async def start(orchestrator: Orchestrator, flow: Flow) -> Flow:
    orchestrator.register_sync_facade("Booking", flow)
    await orchestrator.start()
    return flow


async def test_nodes_run_in_order_and_build_the_response(orchestrator: Orchestrator) -> None:
    flow = await start(
        orchestrator,
        Flow(request=BookingRequest, response=BookingSyncResponse).use(set_order).use(set_payment),
    )

    response = await flow.run("r1", BookingRequest(ProductID=4), BookingSyncResponse())

    assert (response.OrderID, response.PaymentID) == (40, 41)


async def test_the_context_carries_request_id_request_and_facade(
    orchestrator: Orchestrator,
) -> None:
    seen: list[tuple[str, str, int, str]] = []

    async def look(request_id: str, ctx: Ctx) -> None:
        seen.append((request_id, ctx.request_id, ctx.request.ProductID, ctx.facade))

    flow = await start(
        orchestrator, Flow(request=BookingRequest, response=BookingSyncResponse).use(look)
    )
    await flow.run("r2", BookingRequest(ProductID=9), BookingSyncResponse())

    assert seen == [("r2", "r2", 9, "Booking")]


async def test_upstream_metadata_carries_a_per_step_idempotency_key() -> None:
    ctx = Ctx("r3", BookingRequest(), BookingSyncResponse())

    assert ctx.upstream_metadata("create_order") == (
        ("x-request-id", "r3"),
        ("x-idempotency-key", "r3:create_order"),
    )


async def test_a_raising_node_stops_the_flow(orchestrator: Orchestrator) -> None:
    ran: list[str] = []

    async def after(request_id: str, ctx: Ctx) -> None:
        ran.append("after")

    flow = await start(
        orchestrator,
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(set_order)
        .use(decline)
        .use(after),
    )

    with pytest.raises(SagaFailed):
        await flow.run("r4", BookingRequest(ProductID=1), BookingSyncResponse())
    assert ran == []


async def test_saga_failed_names_facade_step_and_request_id(orchestrator: Orchestrator) -> None:
    flow = await start(
        orchestrator,
        Flow(request=BookingRequest, response=BookingSyncResponse).use(set_order).use(decline),
    )

    with pytest.raises(SagaFailed) as failure:
        await flow.run("r5", BookingRequest(ProductID=1), BookingSyncResponse())

    assert failure.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert str(failure.value) == "Booking failed at decline: payment declined (request_id=r5)"


async def test_the_rollback_node_receives_the_saga_data(orchestrator: Orchestrator) -> None:
    recorder = Recorder()
    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(set_order)
        .use(decline)
        .consume_rollback("cancel", recorder)
    )
    await start(orchestrator, flow)

    with pytest.raises(SagaFailed):
        await flow.run("r6", BookingRequest(ProductID=2), BookingSyncResponse())
    await asyncio.wait_for(recorder.received.wait(), 5)

    [rollback] = recorder.rollbacks
    assert rollback.request_id == "r6"
    assert (rollback.facade, rollback.kind, rollback.failed_step) == ("Booking", "sync", "decline")
    assert (rollback.code, rollback.reason) == ("FAILED_PRECONDITION", "payment declined")
    assert rollback.data["request"] == {"ProductID": "2"}
    assert rollback.data["response"] == {"OrderID": "20"}


async def test_a_failing_rollback_is_delivered_again_until_it_succeeds(
    orchestrator: Orchestrator,
) -> None:
    recorder = Recorder(failures=2)
    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(decline)
        .consume_rollback("cancel", recorder)
    )
    await start(orchestrator, flow)

    with pytest.raises(SagaFailed):
        await flow.run("r7", BookingRequest(ProductID=1), BookingSyncResponse())
    await asyncio.wait_for(recorder.received.wait(), 5)

    assert recorder.attempts == 3
    assert len(recorder.rollbacks) == 1


async def test_a_rollback_failing_past_the_delivery_limit_is_dead_lettered(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    recorder = Recorder(failures=100)
    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(decline)
        .consume_rollback("cancel", recorder)
    )
    await start(orchestrator, flow)

    with pytest.raises(SagaFailed):
        await flow.run("r8", BookingRequest(ProductID=1), BookingSyncResponse())
    await asyncio.wait_for(broker.join(), 5)

    assert recorder.attempts == 4
    [dead] = broker.dead_letters
    assert dead.topic == "cancel" and "delivery limit 4" in dead.reason


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (FailedPrecondition("no"), grpc.StatusCode.FAILED_PRECONDITION),
        (BrokerUnavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (TimeoutError(), grpc.StatusCode.UNAVAILABLE),
        (KeyError("secret detail"), grpc.StatusCode.INTERNAL),
    ],
)
async def test_the_failure_status_fits_the_cause(
    orchestrator: Orchestrator, raised: Exception, code: grpc.StatusCode
) -> None:
    async def fail(request_id: str, ctx: Ctx) -> None:
        raise raised

    flow = await start(
        orchestrator, Flow(request=BookingRequest, response=BookingSyncResponse).use(fail)
    )

    with pytest.raises(SagaFailed) as failure:
        await flow.run("r9", BookingRequest(), BookingSyncResponse())
    assert failure.value.code == code


async def test_a_bug_does_not_leak_its_details_to_the_caller(orchestrator: Orchestrator) -> None:
    async def buggy(request_id: str, ctx: Ctx) -> None:
        raise KeyError("secret detail")

    flow = await start(
        orchestrator, Flow(request=BookingRequest, response=BookingSyncResponse).use(buggy)
    )

    with pytest.raises(SagaFailed) as failure:
        await flow.run("r10", BookingRequest(), BookingSyncResponse())
    assert "secret" not in str(failure.value)
    assert "internal error (KeyError)" in str(failure.value)


async def test_a_cancelled_caller_still_gets_its_saga_rolled_back(
    orchestrator: Orchestrator,
) -> None:
    recorder = Recorder()
    entered = asyncio.Event()

    async def slow(request_id: str, ctx: Ctx) -> None:
        entered.set()
        await asyncio.sleep(60)

    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(set_order)
        .use(slow)
        .consume_rollback("cancel", recorder)
    )
    await start(orchestrator, flow)
    run = asyncio.create_task(flow.run("r11", BookingRequest(ProductID=1), BookingSyncResponse()))
    await entered.wait()
    run.cancel()

    with pytest.raises(asyncio.CancelledError):
        await run
    await asyncio.wait_for(recorder.received.wait(), 5)
    assert recorder.rollbacks[0].code == "CANCELLED"


async def test_a_rollback_the_broker_refuses_runs_inline(orchestrator: Orchestrator) -> None:
    recorder = Recorder()
    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(decline)
        .consume_rollback("cancel", recorder)
    )
    await start(orchestrator, flow)

    async def refuse(*args: object, **kwargs: object) -> None:
        raise BrokerUnavailable("broker down")

    orchestrator.broker.publish = refuse  # type: ignore[method-assign]
    with pytest.raises(SagaFailed):
        await flow.run("r12", BookingRequest(ProductID=1), BookingSyncResponse())

    assert [r.request_id for r in recorder.rollbacks] == ["r12"]


def test_two_steps_cannot_share_a_name() -> None:
    with pytest.raises(ValueError, match="already used"):
        Flow(request=BookingRequest, response=BookingSyncResponse).use(set_order).use(set_order)


def test_the_rollback_can_be_consumed_once() -> None:
    flow = Flow(request=BookingRequest, response=BookingSyncResponse).consume_rollback(
        "cancel", Recorder()
    )
    with pytest.raises(ValueError, match="already consumed"):
        flow.consume_rollback("cancel2", Recorder())


def test_steps_lists_the_step_names_in_order() -> None:
    flow = (
        Flow(request=BookingRequest, response=BookingSyncResponse)
        .use(set_order)
        .use(set_payment, name="pay")
    )
    assert flow.steps == ["set_order", "pay"]
