"""Sagas recorded in the store: step log, idempotent requests, replay, recovery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import pytest

from orchestrator import (
    AsyncFacade,
    AsyncFacadeContext,
    BrokerSettings,
    BrokerUnavailable,
    Context,
    FailedPrecondition,
    InMemoryBroker,
    Orchestrator,
    RetryPolicy,
    SagaError,
    SagaFailed,
    SyncFacade,
)
from orchestrator.facade.sync import payload_digest
from orchestrator.store.base import BeginResult, SagaState, StepState, saga_key
from orchestrator.store.memory import InMemorySagaStore
from pb.booking_pb2 import BookingRequest, BookingSyncResponse
from tests.support.fake_store import FakeSagaStore

Ctx = Context[BookingRequest, BookingSyncResponse]
Flow = SyncFacade[BookingRequest, BookingSyncResponse]
NEVER = RetryPolicy(attempts=1, any_error=True)


class Ledger:
    """Counts node runs and compensations."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self.undone: list[str] = []

    def node(self, name: str, order_id: int = 0, *, fail: bool = False) -> object:
        async def node(request_id: str, ctx: Ctx) -> None:
            self.runs[name] = self.runs.get(name, 0) + 1
            await asyncio.sleep(0.01)  # long enough for concurrent duplicates to pile up
            if fail:
                raise FailedPrecondition("declined")
            if order_id:
                ctx.response.OrderID = order_id

        node.__name__ = name
        return node

    def undo(self, name: str) -> object:
        async def undo(request_id: str, ctx: Ctx) -> None:
            self.undone.append(f"{name}:{ctx.response.OrderID}")

        return undo


@pytest.fixture
def store() -> InMemorySagaStore:
    return InMemorySagaStore()


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker(BrokerSettings(redelivery_delay_seconds=0.001))


@pytest.fixture
async def orchestrator(
    broker: InMemoryBroker, store: InMemorySagaStore
) -> AsyncIterator[Orchestrator]:
    orchestrator = Orchestrator(broker, store=store, heartbeat_seconds=60, lease_seconds=5)
    yield orchestrator
    await orchestrator.close()


def booking_flow(ledger: Ledger, *, fail: bool = False) -> Flow:
    flow = Flow(request=BookingRequest, response=BookingSyncResponse)
    flow.use(ledger.node("create_order", order_id=7), compensate=ledger.undo("create_order"))  # type: ignore[arg-type]
    flow.use(ledger.node("create_payment", fail=fail), retry=NEVER)  # type: ignore[arg-type]
    return flow.consume_rollback("cancel")


async def started(orchestrator: Orchestrator, flow: Flow) -> Flow:
    orchestrator.register_sync_facade("Booking", flow)
    await orchestrator.start()
    return flow


async def book(flow: Flow, rid: str = "j1", product: int = 1) -> BookingSyncResponse:
    return await flow.run(rid, BookingRequest(ProductID=product), BookingSyncResponse())


async def test_a_completed_saga_is_recorded_with_its_step_log(
    orchestrator: Orchestrator, store: InMemorySagaStore
) -> None:
    flow = await started(orchestrator, booking_flow(Ledger()))
    await book(flow)

    saga = await store.get(saga_key("Booking", "j1"))
    assert saga is not None
    assert (saga.state, saga.facade, saga.kind) == (SagaState.COMPLETED, "Booking", "sync")
    assert [(s.name, s.state, s.attempts) for s in saga.steps] == [
        ("create_order", StepState.DONE, 1),
        ("create_payment", StepState.DONE, 1),
    ]
    assert '"OrderID": "7"' in saga.data
    assert saga.owner == orchestrator.replica_id


async def test_a_repeated_request_gets_the_stored_response_without_running_again(
    orchestrator: Orchestrator,
) -> None:
    ledger = Ledger()
    flow = await started(orchestrator, booking_flow(ledger))

    first = await book(flow)
    again = await book(flow)

    assert again == first
    assert ledger.runs == {"create_order": 1, "create_payment": 1}


async def test_100_calls_with_one_request_id_run_one_saga_and_get_identical_answers(
    orchestrator: Orchestrator,
) -> None:
    ledger = Ledger()
    flow = await started(orchestrator, booking_flow(ledger))

    concurrent = await asyncio.gather(*(book(flow) for _ in range(50)))
    later = [await book(flow) for _ in range(50)]

    assert ledger.runs == {"create_order": 1, "create_payment": 1}
    answers = {answer.SerializeToString() for answer in [*concurrent, *later]}
    assert answers == {BookingSyncResponse(OrderID=7).SerializeToString()}


async def test_the_same_request_id_with_another_request_is_already_exists(
    orchestrator: Orchestrator,
) -> None:
    flow = await started(orchestrator, booking_flow(Ledger()))
    await book(flow, product=1)

    with pytest.raises(SagaError) as failure:
        await book(flow, product=2)
    assert failure.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "'j1'" in str(failure.value)


async def test_a_failed_saga_ends_compensated_and_its_replay_gets_the_same_error(
    orchestrator: Orchestrator, broker: InMemoryBroker, store: InMemorySagaStore
) -> None:
    ledger = Ledger()
    flow = await started(orchestrator, booking_flow(ledger, fail=True))

    with pytest.raises(SagaFailed) as first:
        await book(flow)
    await asyncio.wait_for(broker.join(), 5)
    with pytest.raises(SagaFailed) as replay:
        await book(flow)

    saga = await store.get(saga_key("Booking", "j1"))
    assert saga is not None and saga.state == SagaState.COMPENSATED
    assert [s.state for s in saga.steps] == [StepState.DONE, StepState.FAILED]
    assert (saga.error_code, saga.error_reason) == ("FAILED_PRECONDITION", "declined")
    assert ledger.undone == ["create_order:7"]
    assert str(replay.value) == str(first.value)
    assert replay.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert ledger.runs["create_payment"] == 1


async def test_a_compensation_that_keeps_failing_leaves_the_saga_compensation_failed(
    orchestrator: Orchestrator, broker: InMemoryBroker, store: InMemorySagaStore
) -> None:
    async def broken_undo(request_id: str, ctx: Ctx) -> None:
        raise ConnectionError("order service gone")

    ledger = Ledger()
    flow = Flow(request=BookingRequest, response=BookingSyncResponse)
    flow.use(
        ledger.node("create_order"),  # type: ignore[arg-type]
        compensate=broken_undo,
        compensate_retry=RetryPolicy(attempts=2, initial_backoff=0.001, any_error=True),
    )
    flow.use(ledger.node("create_payment", fail=True), retry=NEVER)  # type: ignore[arg-type]
    await started(orchestrator, flow.consume_rollback("cancel"))

    with pytest.raises(SagaFailed):
        await book(flow)
    await asyncio.wait_for(broker.join(), 5)

    saga = await store.get(saga_key("Booking", "j1"))
    assert saga is not None and saga.state == SagaState.COMPENSATION_FAILED
    assert "compensation of create_order failed" in saga.error_reason
    assert broker.dead_letters[0].reason.startswith("COMPENSATION_FAILED")


async def test_the_sagas_of_a_dead_replica_are_taken_over_and_rolled_back(
    orchestrator: Orchestrator, broker: InMemoryBroker, store: InMemorySagaStore
) -> None:
    """A replica died after create_order, during create_payment: the saga is rolled back."""
    ledger = Ledger()
    await started(orchestrator, booking_flow(ledger))
    payload = '{"ProductID": "1"}'
    await store.begin(
        request_id=saga_key("Booking", "orphan"),
        facade="Booking",
        kind="sync",
        payload=payload,
        payload_hash=payload_digest("Booking", payload),
        owner="dead-replica",
    )
    key = saga_key("Booking", "orphan")
    await store.step_started(key, 0, "create_order")
    await store.step_finished(key, 0, state=StepState.DONE, data='{"OrderID": "9"}')
    await store.step_started(key, 1, "create_payment")

    assert await orchestrator.recover_now() == 1
    await asyncio.wait_for(broker.join(), 5)

    saga = await store.get(saga_key("Booking", "orphan"))
    assert saga is not None and saga.state == SagaState.COMPENSATED
    assert saga.owner == orchestrator.replica_id
    assert ledger.undone == ["create_order:9"]
    assert await orchestrator.recover_now() == 0


async def test_a_live_replicas_sagas_are_left_alone(
    orchestrator: Orchestrator, store: InMemorySagaStore
) -> None:
    await started(orchestrator, booking_flow(Ledger()))
    await store.begin(
        request_id=saga_key("Booking", "busy"),
        facade="Booking",
        kind="sync",
        payload="{}",
        payload_hash="x",
        owner="other-replica",
    )
    await store.heartbeat("other-replica")

    assert await orchestrator.recover_now() == 0


class Dto(AsyncFacadeContext):
    product_id: int


class CountedHop:
    """An async node that passes its DTO on and counts its runs."""

    def __init__(self) -> None:
        self.runs = 0

    async def __call__(self, dto: Dto) -> Dto:
        self.runs += 1
        return dto


async def test_an_async_saga_is_recorded_and_a_redelivered_done_hop_is_not_run_again(
    orchestrator: Orchestrator, broker: InMemoryBroker, store: InMemorySagaStore
) -> None:
    runs = {"first": 0, "second": 0}
    done = asyncio.Event()

    async def first(dto: Dto) -> Dto:
        runs["first"] += 1
        return dto

    async def second(dto: Dto) -> Dto:
        runs["second"] += 1
        done.set()
        return dto

    flow = AsyncFacade(dto=Dto).use("a", first).use("b", second)
    orchestrator.register_async_facade("Async", flow)
    await orchestrator.start()
    real_publish = broker.publish
    refusals = 1

    async def flaky(topic: str, body: bytes, **kwargs: object) -> None:
        nonlocal refusals
        if topic == "b" and refusals:  # the hop's outcome is lost once: it is redelivered
            refusals -= 1
            raise ConnectionError("publish lost")
        await real_publish(topic, body, **kwargs)  # type: ignore[arg-type]

    broker.publish = flaky  # type: ignore[method-assign]
    await flow.run("a1", Dto(request_id="a1", product_id=3))
    await asyncio.wait_for(done.wait(), 5)
    await asyncio.wait_for(broker.join(), 5)

    assert runs == {"first": 1, "second": 1}
    saga = await store.get(saga_key("Async", "a1"))
    assert saga is not None and saga.state == SagaState.COMPLETED
    assert [s.state for s in saga.steps] == [StepState.DONE, StepState.DONE]


async def test_an_async_request_accepted_twice_runs_once(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    hop = CountedHop()
    flow = AsyncFacade(dto=Dto).use("a", hop, name="only")
    orchestrator.register_async_facade("Async", flow)
    await orchestrator.start()
    await flow.run("a2", Dto(request_id="a2", product_id=1))
    await asyncio.wait_for(broker.join(), 5)
    await flow.run("a2", Dto(request_id="a2", product_id=1))
    await asyncio.wait_for(broker.join(), 5)

    assert hop.runs == 1
    with pytest.raises(SagaError) as failure:
        await flow.run("a2", Dto(request_id="a2", product_id=2))
    assert failure.value.code == grpc.StatusCode.ALREADY_EXISTS


async def test_one_request_id_on_two_facades_is_two_sagas(
    orchestrator: Orchestrator, store: InMemorySagaStore
) -> None:
    ledger = Ledger()
    sync_flow = booking_flow(ledger)
    orchestrator.register_sync_facade("Booking", sync_flow)

    async def only(dto: Dto) -> Dto:
        return dto

    async_flow = AsyncFacade(dto=Dto).use("a", only)
    orchestrator.register_async_facade("Async", async_flow)
    await orchestrator.start()

    await book(sync_flow, "shared")
    await async_flow.run("shared", Dto(request_id="shared", product_id=1))

    assert (await store.get(saga_key("Booking", "shared"))) is not None
    assert (await store.get(saga_key("Async", "shared"))) is not None


class CountingStore(InMemorySagaStore):
    """Counts the writes that make a saga's record durable."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    async def begin(self, **fields: Any) -> BeginResult:
        self.writes += 1
        return await super().begin(**fields)

    async def step_started(self, request_id: str, index: int, name: str) -> None:
        self.writes += 1
        await super().step_started(request_id, index, name)

    async def step_finished(self, request_id: str, index: int, **fields: Any) -> None:
        self.writes += 1
        await super().step_finished(request_id, index, **fields)

    async def set_state(self, request_id: str, state: SagaState, **fields: Any) -> None:
        self.writes += 1
        await super().set_state(request_id, state, **fields)


async def test_a_two_step_sync_saga_costs_three_durable_writes(broker: InMemoryBroker) -> None:
    # Begin with step 0 started, step 0's end with step 1's start, step 1's end with
    # COMPLETED: each step's start is durable before it runs, at one write per step.
    store = CountingStore()
    orchestrator = Orchestrator(broker, store=store, heartbeat_seconds=60)
    try:
        flow = await started(orchestrator, booking_flow(Ledger()))
        await book(flow)

        saga = await store.get(saga_key("Booking", "j1"))
        assert saga is not None and saga.state == SagaState.COMPLETED
        assert [(s.name, s.state) for s in saga.steps] == [
            ("create_order", StepState.DONE),
            ("create_payment", StepState.DONE),
        ]
        assert store.writes == 3
    finally:
        await orchestrator.close()


async def test_listeners_hear_of_each_write_under_the_callers_request_id(
    orchestrator: Orchestrator,
) -> None:
    heard: list[str] = []
    orchestrator.on_saga_change(heard.append)
    flow = await started(orchestrator, booking_flow(Ledger()))

    await book(flow, "j7")

    assert heard == ["j7"] * 3


async def test_a_removed_listener_hears_nothing_more(orchestrator: Orchestrator) -> None:
    heard: list[str] = []
    remove = orchestrator.on_saga_change(heard.append)
    flow = await started(orchestrator, booking_flow(Ledger()))
    await book(flow, "j8")

    remove()
    await book(flow, "j9")

    assert heard == ["j8"] * 3


class FlakyPublishBroker(InMemoryBroker):
    """An in-memory broker whose next `fail_next` publishes fail as an unreachable broker's."""

    def __init__(self) -> None:
        super().__init__(BrokerSettings(redelivery_delay_seconds=0.001))
        self.fail_next = 0

    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise BrokerUnavailable("broker unreachable")
        await super().publish(topic, body, message_id=message_id, headers=headers)


async def test_an_async_request_whose_first_publish_failed_runs_when_retried(
    store: InMemorySagaStore,
) -> None:
    broker = FlakyPublishBroker()
    orchestrator = Orchestrator(broker, store=store, heartbeat_seconds=60)
    hop = CountedHop()
    flow = AsyncFacade(dto=Dto).use("a", hop, name="only")
    orchestrator.register_async_facade("Async", flow)
    try:
        await orchestrator.start()
        broker.fail_next = 1
        with pytest.raises(BrokerUnavailable):
            await flow.run("a3", Dto(request_id="a3", product_id=1))
        await flow.run("a3", Dto(request_id="a3", product_id=1))
        await asyncio.wait_for(broker.join(), 5)

        saga = await store.get(saga_key("Async", "a3"))
        assert saga is not None and saga.state == SagaState.COMPLETED
        assert [(s.state, s.attempts) for s in saga.steps] == [(StepState.DONE, 2)]
        assert hop.runs == 1
    finally:
        await orchestrator.close()


async def test_a_duplicate_of_an_async_request_in_flight_publishes_nothing(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    release = asyncio.Event()
    runs = 0

    async def gated(dto: Dto) -> Dto:
        nonlocal runs
        runs += 1
        await release.wait()
        return dto

    flow = AsyncFacade(dto=Dto).use("a", gated)
    orchestrator.register_async_facade("Async", flow)
    await orchestrator.start()
    # Together: the duplicates find the saga begun, its first hop not yet consumed.
    await asyncio.gather(*(flow.run("a4", Dto(request_id="a4", product_id=1)) for _ in range(6)))
    release.set()
    await asyncio.wait_for(broker.join(), 5)

    assert runs == 1


class FailedStepsUnwritable(InMemorySagaStore):
    """A store that fails to record a step's failure, as a database gone at that moment."""

    async def step_finished(self, request_id: str, index: int, **fields: Any) -> None:
        if fields["state"] == StepState.FAILED:
            raise ConnectionError("database unreachable")
        await super().step_finished(request_id, index, **fields)


async def test_a_failed_sync_saga_is_rolled_back_even_when_its_failure_cannot_be_recorded(
    broker: InMemoryBroker,
) -> None:
    store = FailedStepsUnwritable()
    orchestrator = Orchestrator(broker, store=store, heartbeat_seconds=60)
    ledger = Ledger()
    try:
        flow = await started(orchestrator, booking_flow(ledger, fail=True))
        with pytest.raises(SagaFailed):
            await book(flow, "j10")
        await asyncio.wait_for(broker.join(), 5)

        assert ledger.undone == ["create_order:7"]
        saga = await store.get(saga_key("Booking", "j10"))
        assert saga is not None and saga.state == SagaState.COMPENSATED
    finally:
        await orchestrator.close()


async def test_a_duplicate_waits_on_this_replicas_run_by_its_writes_not_by_polling(
    broker: InMemoryBroker,
) -> None:
    store = FakeSagaStore()
    orchestrator = Orchestrator(broker, store=store, heartbeat_seconds=60)
    release = asyncio.Event()

    async def slow(request_id: str, ctx: Ctx) -> None:
        await release.wait()
        ctx.response.OrderID = 9

    flow = Flow(request=BookingRequest, response=BookingSyncResponse).use(slow, name="create_order")
    try:
        await started(orchestrator, flow)
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(book(flow, "w1"))
        await asyncio.sleep(0.01)
        duplicate = asyncio.create_task(book(flow, "w1"))
        await asyncio.sleep(0.5)  # polling from 10 ms up to 0.2 s would read about 6 times
        release.set()
        async with asyncio.timeout(5):
            answer = await first
            first_done = loop.time()
            again = await duplicate
        late = loop.time() - first_done

        assert answer == again == BookingSyncResponse(OrderID=9)
        assert late < 0.3, f"the duplicate answered {late:.2f}s after the first"
        assert store.gets <= 3, f"the duplicate read the store {store.gets} times"
    finally:
        release.set()
        await orchestrator.close()
