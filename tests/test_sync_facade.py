"""SyncFacade: nodes run in order over a Context; a raising node rolls the saga back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from orchestrator import (
    Context,
    FailedPrecondition,
    InvalidArgument,
    Orchestrator,
    RetryPolicy,
    Rollback,
    SyncFacade,
    idempotency_key,
    step_metadata,
)
from orchestrator.broker import InMemoryBroker
from orchestrator.config import BrokerSettings
from orchestrator.errors import BrokerUnavailable, SagaFailed
from orchestrator.store import SagaRecord, SagaState
from pb.booking_pb2 import BookingRequest, BookingSyncResponse

Ctx = Context[BookingRequest, BookingSyncResponse]
Flow = SyncFacade[BookingRequest, BookingSyncResponse]
QUICK = RetryPolicy(attempts=4, initial_backoff=0.001, max_backoff=0.002, any_error=True)
BOUND = 5.0
"""Seconds any single wait in these tests may take before it fails."""


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


def new_flow() -> Flow:
    return Flow(request=BookingRequest, response=BookingSyncResponse)


async def start(orchestrator: Orchestrator, flow: Flow) -> Flow:
    orchestrator.register_sync_facade("Booking", flow)
    await orchestrator.start()
    return flow


async def ended(flow: Flow, request_id: str) -> SagaRecord:
    """The saga of `request_id` once it is finished (within BOUND seconds)."""
    async with asyncio.timeout(BOUND):
        return await flow.wait_for(request_id)


def metric(orchestrator: Orchestrator, name: str) -> float:
    labels = {"facade": "Booking", "kind": "sync"}
    return orchestrator.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_nodes_run_in_order_and_build_the_response(orchestrator: Orchestrator) -> None:
    flow = await start(
        orchestrator,
        new_flow().use(set_order).use(set_payment),
    )

    response = await flow.run("r1", BookingRequest(ProductID=4), BookingSyncResponse())

    assert (response.OrderID, response.PaymentID) == (40, 41)


async def test_the_context_carries_request_id_request_and_facade(
    orchestrator: Orchestrator,
) -> None:
    seen: list[tuple[str, str, int, str]] = []

    async def look(request_id: str, ctx: Ctx) -> None:
        seen.append((request_id, ctx.request_id, ctx.request.ProductID, ctx.facade))

    flow = await start(orchestrator, new_flow().use(look))
    await flow.run("r2", BookingRequest(ProductID=9), BookingSyncResponse())

    assert seen == [("r2", "r2", 9, "Booking")]


async def test_step_metadata_in_a_node_carries_the_request_id_and_its_steps_idempotency_key(
    orchestrator: Orchestrator,
) -> None:
    seen: list[tuple[tuple[str, str], ...]] = []

    async def create_order(request_id: str, ctx: Ctx) -> None:
        seen.append(step_metadata())

    flow = await start(orchestrator, new_flow().use(create_order))
    await flow.run("r3", BookingRequest(), BookingSyncResponse())

    assert seen == [
        (("x-request-id", "r3"), ("x-idempotency-key", "Booking:r3:create_order")),
    ]


async def test_idempotency_key_names_the_running_step_or_another_step_of_the_same_saga(
    orchestrator: Orchestrator,
) -> None:
    keys: list[tuple[str, str]] = []

    async def create_payment(request_id: str, ctx: Ctx) -> None:
        keys.append((idempotency_key(), idempotency_key("set_order")))

    flow = await start(orchestrator, new_flow().use(set_order).use(create_payment))
    await flow.run("r3b", BookingRequest(), BookingSyncResponse())

    assert keys == [("Booking:r3b:create_payment", "Booking:r3b:set_order")]


async def test_a_compensation_runs_under_the_compensation_key_of_its_step(
    orchestrator: Orchestrator,
) -> None:
    seen: list[tuple[tuple[tuple[str, str], ...], str]] = []

    async def undo_order(request_id: str, ctx: Ctx) -> None:
        seen.append((step_metadata(), idempotency_key("set_order")))

    flow = await start(
        orchestrator,
        new_flow().use(set_order, compensate=undo_order).use(decline).consume_rollback("cancel"),
    )
    with pytest.raises(SagaFailed):
        await flow.run("r3c", BookingRequest(), BookingSyncResponse())
    await ended(flow, "r3c")

    assert seen == [
        (
            (("x-request-id", "r3c"), ("x-idempotency-key", "Booking:r3c:set_order:compensation")),
            "Booking:r3c:set_order",
        )
    ]


async def test_the_rollback_node_runs_under_the_sagas_rollback_key(
    orchestrator: Orchestrator,
) -> None:
    seen: list[tuple[tuple[tuple[str, str], ...], str]] = []

    async def cancel(rollback: Rollback) -> None:
        seen.append((step_metadata(), idempotency_key("set_order")))

    flow = await start(
        orchestrator, new_flow().use(set_order).use(decline).consume_rollback("cancel", cancel)
    )
    with pytest.raises(SagaFailed):
        await flow.run("r3d", BookingRequest(), BookingSyncResponse())
    await ended(flow, "r3d")

    assert seen == [
        (
            (("x-request-id", "r3d"), ("x-idempotency-key", "Booking:r3d:rollback")),
            "Booking:r3d:set_order",
        )
    ]


def test_step_metadata_and_idempotency_key_outside_a_node_are_a_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="no saga step is running"):
        step_metadata()
    with pytest.raises(RuntimeError, match="no saga step is running"):
        idempotency_key("create_order")


async def test_a_raising_node_stops_the_flow(orchestrator: Orchestrator) -> None:
    ran: list[str] = []

    async def after(request_id: str, ctx: Ctx) -> None:
        ran.append("after")

    flow = await start(
        orchestrator,
        new_flow().use(set_order).use(decline).use(after),
    )

    with pytest.raises(SagaFailed):
        await flow.run("r4", BookingRequest(ProductID=1), BookingSyncResponse())
    assert ran == []


async def test_saga_failed_names_facade_step_and_request_id(orchestrator: Orchestrator) -> None:
    flow = await start(
        orchestrator,
        new_flow().use(set_order).use(decline),
    )

    with pytest.raises(SagaFailed) as failure:
        await flow.run("r5", BookingRequest(ProductID=1), BookingSyncResponse())

    assert failure.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert str(failure.value) == "Booking failed at decline: payment declined (request_id=r5)"


async def test_the_rollback_node_receives_the_saga_data(orchestrator: Orchestrator) -> None:
    recorder = Recorder()
    flow = new_flow().use(set_order).use(decline).consume_rollback("cancel", recorder)
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


async def test_a_failing_rollback_node_is_retried_under_its_policy_until_it_succeeds(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    recorder = Recorder(failures=2)
    flow = new_flow().use(decline).consume_rollback("cancel", recorder, retry=QUICK)
    await start(orchestrator, flow)

    with pytest.raises(SagaFailed):
        await flow.run("r7", BookingRequest(ProductID=1), BookingSyncResponse())
    saga = await ended(flow, "r7")

    assert saga.state == SagaState.COMPENSATED
    assert recorder.attempts == 3
    assert len(recorder.rollbacks) == 1
    await asyncio.wait_for(broker.join(), BOUND)
    assert broker.dead_letters == []
    redelivered = orchestrator.metrics.registry.get_sample_value(
        "orchestrator_redeliveries_total", {"topic": "cancel"}
    )
    assert not redelivered  # retried in place: the rollback message was delivered once


async def test_a_rollback_node_failing_past_its_retry_policy_leaves_the_saga_compensation_failed(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    recorder = Recorder(failures=100)
    flow = new_flow().use(decline).consume_rollback("cancel", recorder, retry=QUICK)
    await start(orchestrator, flow)

    with pytest.raises(SagaFailed):
        await flow.run("r8", BookingRequest(ProductID=1), BookingSyncResponse())
    saga = await ended(flow, "r8")
    await asyncio.wait_for(broker.join(), BOUND)

    assert recorder.attempts == 4
    assert saga.state == SagaState.COMPENSATION_FAILED
    assert saga.error_reason.startswith("rollback node failed")
    assert metric(orchestrator, "orchestrator_sagas_compensation_failed_total") == 1
    [dead] = broker.dead_letters
    assert dead.topic == "cancel"
    assert dead.reason.startswith("COMPENSATION_FAILED: rollback node failed: ")


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

    flow = await start(orchestrator, new_flow().use(fail))

    with pytest.raises(SagaFailed) as failure:
        await flow.run("r9", BookingRequest(), BookingSyncResponse())
    assert failure.value.code == code


async def test_a_bug_does_not_leak_its_details_to_the_caller(orchestrator: Orchestrator) -> None:
    async def buggy(request_id: str, ctx: Ctx) -> None:
        raise KeyError("secret detail")

    flow = await start(orchestrator, new_flow().use(buggy))

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

    flow = new_flow().use(set_order).use(slow).consume_rollback("cancel", recorder)
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
    flow = new_flow().use(decline).consume_rollback("cancel", recorder)
    await start(orchestrator, flow)

    async def refuse(*args: object, **kwargs: object) -> None:
        raise BrokerUnavailable("broker down")

    orchestrator.broker.publish = refuse  # type: ignore[method-assign]
    with pytest.raises(SagaFailed):
        await flow.run("r12", BookingRequest(ProductID=1), BookingSyncResponse())

    assert [r.request_id for r in recorder.rollbacks] == ["r12"]


def test_two_steps_cannot_share_a_name() -> None:
    with pytest.raises(ValueError, match="already used"):
        new_flow().use(set_order).use(set_order)


def test_the_rollback_can_be_consumed_once() -> None:
    flow = new_flow().consume_rollback("cancel", Recorder())
    with pytest.raises(ValueError, match="already consumed"):
        flow.consume_rollback("cancel2", Recorder())


def test_steps_lists_the_step_names_in_order() -> None:
    flow = new_flow().use(set_order).use(set_payment, name="pay")
    assert flow.steps == ["set_order", "pay"]


def test_a_plain_def_node_is_refused_at_use_naming_it() -> None:
    def create_order(request_id: str, ctx: Ctx) -> None:
        pass

    with pytest.raises(TypeError, match=r"node 'create_order' must be an async def"):
        new_flow().use(create_order)  # type: ignore[arg-type]


def test_a_compensation_of_the_wrong_shape_is_refused_at_use_naming_its_step() -> None:
    async def undo(ctx: Ctx) -> None:
        pass

    with pytest.raises(
        TypeError, match=r"compensation of 'set_order' must take \(request_id, ctx\)"
    ):
        new_flow().use(set_order, compensate=undo)  # type: ignore[arg-type]


async def _rollback_of_two(request_id: str, rollback: Rollback) -> None:
    pass


def _plain_rollback(rollback: Rollback) -> None:
    pass


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (_rollback_of_two, r"rollback node '_rollback_of_two' must take \(rollback\)"),
        (_plain_rollback, r"rollback node '_plain_rollback' must be an async def"),
    ],
)
def test_a_rollback_node_of_the_wrong_shape_is_refused_at_consume_rollback_naming_it(
    node: object, message: str
) -> None:
    flow = new_flow().use(set_order)

    with pytest.raises(TypeError, match=message):
        flow.consume_rollback("cancel", node)  # type: ignore[arg-type]
    assert flow.rollback_topic == ""


def test_a_step_name_holding_a_separator_is_refused() -> None:
    with pytest.raises(ValueError, match="step name 'create:order'"):
        new_flow().use(set_order, name="create:order")
