"""Sagas recorded in the store: step log, idempotent requests, replay, recovery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from orchestrator import (
    AsyncFacade,
    AsyncFacadeContext,
    Context,
    FailedPrecondition,
    Orchestrator,
    RetryPolicy,
    SagaError,
    SyncFacade,
)
from orchestrator.broker import InMemoryBroker
from orchestrator.config import BrokerSettings, SagaSettings
from orchestrator.errors import BrokerUnavailable, SagaFailed
from orchestrator.facade._runtime import payload_digest
from orchestrator.store import (
    Change,
    CompensationState,
    InMemorySagaStore,
    NewSaga,
    SagaRecord,
    SagaState,
    StepEnded,
    StepFailed,
    StepState,
)
from pb.booking_pb2 import BookingRequest, BookingSyncResponse
from tests.support.fake_store import FakeSagaStore

Ctx = Context[BookingRequest, BookingSyncResponse]
Flow = SyncFacade[BookingRequest, BookingSyncResponse]
NEVER = RetryPolicy(attempts=1, any_error=True)
BOUND = 5.0
"""Seconds any single wait in these tests may take before it fails."""


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


async def ended(flow: Flow | AsyncFacade[Dto], request_id: str) -> SagaRecord:
    """The saga of `request_id` once it is finished (within BOUND seconds)."""
    async with asyncio.timeout(BOUND):
        return await flow.wait_for(request_id)


async def recovered(orchestrator: Orchestrator) -> int:
    """Run recovery rounds until one takes over a stalled saga (within BOUND seconds):
    how many it took. The saga's deadline is what the test waits for."""
    async with asyncio.timeout(BOUND):
        # Polling on purpose: nothing announces that a deadline has passed.
        while not (claimed := await orchestrator.recover_now()):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return claimed


def new_saga(
    request_id: str, owner: str, *, payload: str = "{}", deadline_seconds: float = 300
) -> NewSaga:
    """A Booking saga begun by replica `owner`, at create_order."""
    return NewSaga(
        facade="Booking",
        request_id=request_id,
        kind="sync",
        payload=payload,
        payload_hash=payload_digest("Booking", payload),
        owner=owner,
        first_step="create_order",
        deadline_at=datetime.now(UTC) + timedelta(seconds=deadline_seconds),
    )


async def test_a_completed_saga_is_recorded_with_its_step_log(
    orchestrator: Orchestrator, store: InMemorySagaStore
) -> None:
    flow = await started(orchestrator, booking_flow(Ledger()))
    await book(flow)

    saga = await store.get("Booking", "j1")
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
    orchestrator: Orchestrator,
) -> None:
    ledger = Ledger()
    flow = await started(orchestrator, booking_flow(ledger, fail=True))

    with pytest.raises(SagaFailed) as first:
        await book(flow)
    saga = await ended(flow, "j1")
    with pytest.raises(SagaFailed) as replay:
        await book(flow)

    assert saga.state == SagaState.COMPENSATED
    assert [s.state for s in saga.steps] == [StepState.DONE, StepState.FAILED]
    assert (saga.error_code, saga.error_reason) == ("FAILED_PRECONDITION", "declined")
    assert ledger.undone == ["create_order:7"]
    assert str(replay.value) == str(first.value)
    assert replay.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert ledger.runs["create_payment"] == 1


async def test_a_compensation_that_keeps_failing_leaves_the_saga_compensation_failed(
    orchestrator: Orchestrator, broker: InMemoryBroker
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
    saga = await ended(flow, "j1")
    await asyncio.wait_for(broker.join(), BOUND)

    assert saga.state == SagaState.COMPENSATION_FAILED
    assert "compensation of create_order failed" in saga.error_reason
    assert (saga.steps[0].compensation, saga.steps[0].compensation_error) == (
        CompensationState.FAILED,
        saga.error_reason,
    )
    assert broker.dead_letters[0].reason.startswith("COMPENSATION_FAILED")


async def test_the_sagas_of_a_dead_replica_are_taken_over_and_rolled_back(
    orchestrator: Orchestrator, store: InMemorySagaStore
) -> None:
    """A replica died after create_order, during create_payment: the saga is rolled back."""
    ledger = Ledger()
    flow = await started(orchestrator, booking_flow(ledger))
    await store.begin(new_saga("orphan", "dead-replica", payload='{"ProductID": "1"}'))
    ended_order = StepEnded(0, '{"OrderID": "9"}', next_step="create_payment")
    assert await store.apply("Booking", "orphan", ended_order)

    assert await orchestrator.recover_now() == 1
    saga = await ended(flow, "orphan")

    assert saga.state == SagaState.COMPENSATED
    assert saga.error_code == "ABORTED"
    assert saga.owner == orchestrator.replica_id
    assert [(s.name, s.state) for s in saga.steps] == [
        ("create_order", StepState.DONE),
        ("create_payment", StepState.FAILED),
    ]
    assert ledger.undone == ["create_order:9"]
    assert await orchestrator.recover_now() == 0


async def test_a_live_replicas_sagas_are_left_alone(
    orchestrator: Orchestrator, store: InMemorySagaStore
) -> None:
    await started(orchestrator, booking_flow(Ledger()))
    await store.begin(new_saga("busy", "other-replica"))
    await store.heartbeat("other-replica")

    assert await orchestrator.recover_now() == 0


async def test_a_sync_saga_past_its_deadline_is_rolled_back_and_its_caller_gets_the_failure(
    broker: InMemoryBroker, store: InMemorySagaStore
) -> None:
    orchestrator = Orchestrator(
        broker, store=store, heartbeat_seconds=60, sagas=SagaSettings(deadline_seconds=0.2)
    )
    ledger = Ledger()
    entered, release = asyncio.Event(), asyncio.Event()

    async def stuck_payment(request_id: str, ctx: Ctx) -> None:
        entered.set()
        await release.wait()

    async def refund(request_id: str, ctx: Ctx) -> None:
        ledger.undone.append("create_payment")

    flow = Flow(request=BookingRequest, response=BookingSyncResponse)
    flow.use(ledger.node("create_order", order_id=7), compensate=ledger.undo("create_order"))  # type: ignore[arg-type]
    flow.use(stuck_payment, name="create_payment", compensate=refund)
    try:
        await started(orchestrator, flow.consume_rollback("cancel"))
        caller = asyncio.create_task(book(flow, "late"))
        await asyncio.wait_for(entered.wait(), BOUND)

        assert await recovered(orchestrator) == 1
        saga = await ended(flow, "late")
        release.set()
        with pytest.raises(SagaFailed) as failure:
            await asyncio.wait_for(caller, BOUND)

        assert failure.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert failure.value.step == "create_payment"
        assert (saga.state, saga.error_code) == (SagaState.COMPENSATED, "DEADLINE_EXCEEDED")
        # The step it was stopped at may have taken effect: undone too, first.
        assert ledger.undone == ["create_payment", "create_order:7"]
    finally:
        release.set()
        await orchestrator.close()


async def test_a_compensating_saga_whose_rollback_was_lost_is_compensated_by_recovery(
    store: InMemorySagaStore,
) -> None:
    broker = LosingBroker()
    orchestrator = Orchestrator(
        broker, store=store, heartbeat_seconds=60, sagas=SagaSettings(compensation_seconds=0.5)
    )
    ledger = Ledger()
    try:
        flow = await started(orchestrator, booking_flow(ledger, fail=True))
        broker.lose.add("cancel")
        with pytest.raises(SagaFailed):
            await book(flow, "lost")
        await asyncio.wait_for(broker.join(), BOUND)
        stalled = await store.get("Booking", "lost")
        assert stalled is not None and stalled.state == SagaState.COMPENSATING
        assert ledger.undone == []
        assert await orchestrator.recover_now() == 0  # its compensation_seconds have not passed

        assert await recovered(orchestrator) == 1
        saga = await ended(flow, "lost")

        assert saga.state == SagaState.COMPENSATED
        assert ledger.undone == ["create_order:7"]
    finally:
        await orchestrator.close()


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
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    runs = {"first": 0, "second": 0}

    async def first(dto: Dto) -> Dto:
        runs["first"] += 1
        return dto

    async def second(dto: Dto) -> Dto:
        runs["second"] += 1
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
    saga = await ended(flow, "a1")
    await asyncio.wait_for(broker.join(), BOUND)

    assert runs == {"first": 1, "second": 1}
    assert saga.state == SagaState.COMPLETED
    assert [s.state for s in saga.steps] == [StepState.DONE, StepState.DONE]


async def test_an_async_request_accepted_twice_runs_once(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    hop = CountedHop()
    flow = AsyncFacade(dto=Dto).use("a", hop, name="only")
    orchestrator.register_async_facade("Async", flow)
    await orchestrator.start()
    await flow.run("a2", Dto(request_id="a2", product_id=1))
    await asyncio.wait_for(broker.join(), BOUND)
    await flow.run("a2", Dto(request_id="a2", product_id=1))
    await asyncio.wait_for(broker.join(), BOUND)

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

    async with asyncio.timeout(BOUND):
        await async_flow.wait_for("shared")
    booking = await store.get("Booking", "shared")
    hop = await store.get("Async", "shared")
    assert booking is not None and (booking.kind, booking.state) == ("sync", SagaState.COMPLETED)
    assert hop is not None and (hop.kind, hop.state) == ("async", SagaState.COMPLETED)


class CountingStore(InMemorySagaStore):
    """Counts the writes that make a saga's record durable."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    async def begin(self, saga: NewSaga) -> SagaRecord | None:
        self.writes += 1
        return await super().begin(saga)

    async def apply(self, facade: str, request_id: str, change: Change) -> bool:
        self.writes += 1
        return await super().apply(facade, request_id, change)


async def test_a_two_step_sync_saga_costs_three_durable_writes(broker: InMemoryBroker) -> None:
    # Begin with step 0 started, step 0's end with step 1's start, step 1's end with
    # COMPLETED: each step's start is durable before it runs, at one write per step.
    store = CountingStore()
    orchestrator = Orchestrator(broker, store=store, heartbeat_seconds=60)
    try:
        flow = await started(orchestrator, booking_flow(Ledger()))
        await book(flow)

        saga = await store.get("Booking", "j1")
        assert saga is not None and saga.state == SagaState.COMPLETED
        assert [(s.name, s.state) for s in saga.steps] == [
            ("create_order", StepState.DONE),
            ("create_payment", StepState.DONE),
        ]
        assert store.writes == 3
    finally:
        await orchestrator.close()


async def test_listeners_hear_of_each_write_under_the_facade_and_the_callers_request_id(
    orchestrator: Orchestrator,
) -> None:
    heard: list[tuple[str, str]] = []
    orchestrator.on_saga_change(lambda facade, request_id: heard.append((facade, request_id)))
    flow = await started(orchestrator, booking_flow(Ledger()))

    await book(flow, "j7")

    assert heard == [("Booking", "j7")] * 3


async def test_a_removed_listener_hears_nothing_more(orchestrator: Orchestrator) -> None:
    heard: list[str] = []
    remove = orchestrator.on_saga_change(lambda facade, request_id: heard.append(request_id))
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
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise BrokerUnavailable("broker unreachable")
        await super().publish(topic, body, message_id=message_id, headers=headers)


class LosingBroker(InMemoryBroker):
    """An in-memory broker that confirms, then loses, the publishes to the topics in `lose`."""

    def __init__(self) -> None:
        super().__init__(BrokerSettings(redelivery_delay_seconds=0.001))
        self.lose: set[str] = set()

    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        if topic not in self.lose:
            await super().publish(topic, body, message_id=message_id, headers=headers)


async def test_an_async_request_whose_first_publish_failed_records_nothing_and_runs_when_retried(
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
        # The first hop is published before the saga is recorded: a refused publish leaves
        # no saga behind.
        assert await store.get("Async", "a3") is None
        await flow.run("a3", Dto(request_id="a3", product_id=1))
        saga = await ended(flow, "a3")

        assert saga.state == SagaState.COMPLETED
        assert [(s.state, s.attempts) for s in saga.steps] == [(StepState.DONE, 1)]
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
    await asyncio.wait_for(broker.join(), BOUND)

    assert runs == 1


class FailedStepsUnwritable(InMemorySagaStore):
    """A store that fails to record a step's failure, as a database gone at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def apply(self, facade: str, request_id: str, change: Change) -> bool:
        if self.down and isinstance(change, StepFailed):
            raise ConnectionError("database unreachable")
        return await super().apply(facade, request_id, change)


async def test_a_failed_sync_saga_whose_failure_cannot_be_recorded_is_compensated_from_memory(
    broker: InMemoryBroker,
) -> None:
    store = FailedStepsUnwritable()
    orchestrator = Orchestrator(broker, store=store, heartbeat_seconds=60)
    ledger = Ledger()
    try:
        flow = await started(orchestrator, booking_flow(ledger, fail=True))
        with pytest.raises(SagaFailed):
            await book(flow, "j10")

        assert ledger.undone == ["create_order:7"]
        saga = await store.get("Booking", "j10")
        assert saga is not None and saga.state == SagaState.RUNNING
        assert saga.current_step is not None and saga.current_step.name == "create_payment"
    finally:
        await orchestrator.close()


async def test_an_unrecorded_failure_is_recorded_by_recovery_at_the_sagas_deadline(
    broker: InMemoryBroker,
) -> None:
    store = FailedStepsUnwritable()
    orchestrator = Orchestrator(
        broker, store=store, heartbeat_seconds=60, sagas=SagaSettings(deadline_seconds=0.2)
    )
    ledger = Ledger()
    try:
        flow = await started(orchestrator, booking_flow(ledger, fail=True))
        with pytest.raises(SagaFailed):
            await book(flow, "j11")
        store.down = False

        assert await recovered(orchestrator) == 1
        saga = await ended(flow, "j11")

        assert (saga.state, saga.error_code) == (SagaState.COMPENSATED, "DEADLINE_EXCEEDED")
        # Undone from memory first, then again by recovery: compensations are idempotent.
        assert ledger.undone == ["create_order:7", "create_order:7"]
    finally:
        await orchestrator.close()


async def test_a_duplicate_waits_on_this_replicas_run_by_its_writes_not_by_polling(
    broker: InMemoryBroker,
) -> None:
    store = FakeSagaStore()
    orchestrator = Orchestrator(broker, store=store, heartbeat_seconds=60)
    release = asyncio.Event()

    entered = asyncio.Event()

    async def slow(request_id: str, ctx: Ctx) -> None:
        entered.set()
        await release.wait()
        ctx.response.OrderID = 9

    flow = Flow(request=BookingRequest, response=BookingSyncResponse).use(slow, name="create_order")
    try:
        await started(orchestrator, flow)
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(book(flow, "w1"))
        await asyncio.wait_for(entered.wait(), BOUND)
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
