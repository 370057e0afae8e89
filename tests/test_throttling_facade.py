"""ThrottlingFacade on the in-memory broker: the caller gets the saga's outcome, hop by hop
through the topics; the wait is woken by the journal's changes and bounded; and an async
facade may be configured to run as throttling or inline."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest

from orchestrator.broker.memory import InMemoryBroker
from orchestrator.config import BrokerSettings, SagaSettings
from orchestrator.dto import AsyncFacadeContext, Rollback
from orchestrator.errors import DeadlineExceeded, FailedPrecondition, SagaError, SagaFailed
from orchestrator.facade import _ending as ending
from orchestrator.facade import async_ as async_facade
from orchestrator.facade.async_ import AsyncFacade
from orchestrator.facade.sync import SyncFacade
from orchestrator.facade.throttling import ThrottlingFacade
from orchestrator.registry import Orchestrator
from orchestrator.retry import caller_deadline
from orchestrator.store import SagaState, SagaStore, StepEnded
from pb.booking_pb2 import BookingRequest, BookingSyncResponse
from tests.support.databases import StoreOpener
from tests.support.fake_store import FakeSagaStore

BOUND = 5.0
"""Seconds any single wait in these tests may take before it fails."""


class OrderDTO(AsyncFacadeContext):
    product_id: int
    order_id: int = 0
    payment_id: int = 0


class Saga:
    """Nodes and a rollback node that record what they saw; the payment may be held back."""

    def __init__(self, *, decline: bool = False) -> None:
        self.decline = decline
        self.calls: list[tuple[str, str]] = []
        self.rollbacks: list[str] = []
        self.payment_gate: asyncio.Event | None = None
        """When set to an event, create_payment waits for it."""
        self.tasks: set[asyncio.Task[object] | None] = set()

    async def create_order(self, dto: OrderDTO) -> OrderDTO:
        self.calls.append(("create_order", dto.request_id))
        self.tasks.add(asyncio.current_task())
        dto.order_id = dto.product_id * 10
        return dto

    async def create_payment(self, dto: OrderDTO) -> OrderDTO:
        self.calls.append(("create_payment", dto.request_id))
        self.tasks.add(asyncio.current_task())
        if self.payment_gate is not None:
            await self.payment_gate.wait()
        if self.decline:
            raise FailedPrecondition("payment declined")
        dto.payment_id = dto.order_id + 1
        return dto

    async def cancel(self, rollback: Rollback) -> None:
        self.rollbacks.append(rollback.request_id)

    async def held_at_payment(self, request_id: str) -> None:
        """Return once `request_id`'s payment has begun (bounded)."""
        async with asyncio.timeout(BOUND):
            while ("create_payment", request_id) not in self.calls:  # noqa: ASYNC110
                await asyncio.sleep(0.01)


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker(BrokerSettings(redelivery_delay_seconds=0.001, delivery_limit=3))


@pytest.fixture
def store() -> FakeSagaStore:
    return FakeSagaStore()


@pytest.fixture
async def orchestrator(broker: InMemoryBroker, store: FakeSagaStore) -> AsyncIterator[Orchestrator]:
    orchestrator = Orchestrator(broker, store=store, heartbeat_seconds=60)
    yield orchestrator
    await orchestrator.close()


def throttling(saga: Saga) -> ThrottlingFacade[OrderDTO]:
    flow = ThrottlingFacade(dto=OrderDTO)
    flow.use("order", saga.create_order).use("payment", saga.create_payment)
    return flow.consume_rollback("cancel", saga.cancel)


async def started(orchestrator: Orchestrator, saga: Saga) -> ThrottlingFacade[OrderDTO]:
    flow = throttling(saga)
    orchestrator.register_throttling_facade("Booking", flow)
    await orchestrator.start()
    return flow


async def booked(flow: ThrottlingFacade[OrderDTO], request_id: str, product: int = 1) -> OrderDTO:
    async with asyncio.timeout(BOUND):
        return await flow.run(request_id, OrderDTO(request_id=request_id, product_id=product))


async def caller_held_at_payment(
    orchestrator: Orchestrator, saga: Saga, request_id: str
) -> asyncio.Task[OrderDTO]:
    """A caller of the throttling facade, once its saga is at its payment step (which waits
    for `saga.payment_gate`)."""
    flow = await started(orchestrator, saga)
    waiting = asyncio.create_task(booked(flow, request_id))
    await saga.held_at_payment(request_id)
    return waiting


async def pay_through(store: SagaStore, request_id: str, *, payment_id: int) -> None:
    """End a saga held at its payment step with a write of `store`'s own, not of the engine's
    (as another replica would end it)."""
    body = OrderDTO(request_id=request_id, product_id=1, order_id=10, payment_id=payment_id)
    ended = StepEnded(1, body.model_dump_json(), complete=True)
    assert await store.apply("Booking", request_id, ended)


def readers(
    monkeypatch: pytest.MonkeyPatch, store: SagaStore, method: str
) -> list[asyncio.Task[object] | None]:
    """The task of each call of `store`'s read `method` from now on, in order."""
    tasks: list[asyncio.Task[object] | None] = []
    read = getattr(store, method)

    async def counted(facade: str, request_id: str) -> object:
        tasks.append(asyncio.current_task())
        return await read(facade, request_id)

    monkeypatch.setattr(store, method, counted)
    return tasks


async def test_run_returns_the_dto_the_last_node_left(orchestrator: Orchestrator) -> None:
    saga = Saga()
    flow = await started(orchestrator, saga)

    dto = await booked(flow, "t1", product=3)

    assert (dto.order_id, dto.payment_id) == (30, 31)
    assert saga.calls == [("create_order", "t1"), ("create_payment", "t1")]
    record = await orchestrator.store.get("Booking", "t1")
    assert record is not None and (record.kind, record.state) == ("throttling", "COMPLETED")


async def test_a_failed_saga_raises_its_status_once_its_compensation_has_run(
    orchestrator: Orchestrator,
) -> None:
    saga = Saga(decline=True)
    flow = await started(orchestrator, saga)

    with pytest.raises(SagaFailed) as failure:
        await booked(flow, "t2")

    assert failure.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.value.step == "create_payment"
    assert saga.rollbacks == ["t2"]  # the rollback node ran before the answer
    record = await orchestrator.store.get("Booking", "t2")
    assert record is not None and record.state == SagaState.COMPENSATED


async def test_a_repeated_request_id_waits_on_the_same_saga(orchestrator: Orchestrator) -> None:
    saga = Saga()
    saga.payment_gate = asyncio.Event()
    flow = await started(orchestrator, saga)
    first = asyncio.create_task(booked(flow, "t3"))
    await saga.held_at_payment("t3")
    again = asyncio.create_task(booked(flow, "t3"))
    await asyncio.sleep(0.05)
    assert not again.done()

    saga.payment_gate.set()

    assert await first == await again
    assert saga.calls == [("create_order", "t3"), ("create_payment", "t3")]
    # After its end, the same request is answered from the journal at once.
    assert (await booked(flow, "t3")).payment_id == 11
    assert len(saga.calls) == 2


async def test_the_same_request_id_with_another_dto_is_already_exists(
    orchestrator: Orchestrator,
) -> None:
    flow = await started(orchestrator, Saga())
    await booked(flow, "t4", product=1)

    with pytest.raises(SagaError) as failure:
        await booked(flow, "t4", product=2)

    assert failure.value.code == grpc.StatusCode.ALREADY_EXISTS


async def test_a_wait_past_the_callers_deadline_is_deadline_exceeded_and_the_saga_goes_on(
    orchestrator: Orchestrator,
) -> None:
    saga = Saga()
    saga.payment_gate = asyncio.Event()
    flow = await started(orchestrator, saga)
    loop = asyncio.get_running_loop()
    caller_deadline.set(loop.time() + 0.4)
    began = loop.time()

    with pytest.raises(DeadlineExceeded) as failure:
        await booked(flow, "t5")

    waited = loop.time() - began
    assert 0.2 < waited < 0.4, waited  # before the caller's own deadline, to answer it
    assert failure.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "'t5'" in str(failure.value) and "goes on" in str(failure.value)
    saga.payment_gate.set()
    async with asyncio.timeout(BOUND):
        ended = await flow.wait_for("t5")
    assert ended.state == SagaState.COMPLETED


async def test_a_wait_is_bounded_by_the_facades_max_wait(
    broker: InMemoryBroker, store: FakeSagaStore
) -> None:
    orchestrator = Orchestrator(
        broker,
        store=store,
        heartbeat_seconds=60,
        sagas=SagaSettings.model_validate({"facades": {"Booking": {"max_wait_seconds": 0.2}}}),
    )
    saga = Saga()
    saga.payment_gate = asyncio.Event()
    try:
        flow = await started(orchestrator, saga)
        with pytest.raises(DeadlineExceeded):
            await booked(flow, "t6")
        saga.payment_gate.set()
    finally:
        await orchestrator.close()


async def test_the_wait_wakes_on_another_replicas_write_heard_through_the_store_not_by_polling(
    orchestrator: Orchestrator, store: FakeSagaStore
) -> None:
    saga = Saga()
    saga.payment_gate = asyncio.Event()
    flow = await started(orchestrator, saga)
    waiting = asyncio.create_task(booked(flow, "t7"))
    await saga.held_at_payment("t7")
    reads = store.position_reads

    await asyncio.sleep(0.5)  # a poll every 0.2 s would read the saga twice meanwhile
    assert store.position_reads == reads
    # Another replica finishes the hop: a write this replica's engine did not make.
    await pay_through(store, "t7", payment_id=99)

    assert (await waiting).payment_id == 99
    assert store.position_reads == reads + 1
    saga.payment_gate.set()


async def test_a_first_hop_delivered_before_its_saga_is_recorded_runs_once_the_begin_lands(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    saga = Saga()
    flow = await started(orchestrator, saga)
    dto = OrderDTO(request_id="t8", product_id=2, topics=["order", "payment"])
    dto.rollback_topic = "cancel"
    body = dto.model_dump_json()
    await broker.publish("order", body.encode(), message_id="t8:0:order")
    await asyncio.sleep(0.2)
    assert saga.calls == []  # its consumer waits for the saga

    await flow.runtime.begin("t8", body)

    async with asyncio.timeout(BOUND):
        ended = await flow.wait_for("t8")
    assert ended.state == SagaState.COMPLETED
    assert saga.calls == [("create_order", "t8"), ("create_payment", "t8")]


async def test_a_first_hop_whose_saga_never_comes_is_dead_lettered_after_the_grace(
    orchestrator: Orchestrator, broker: InMemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(async_facade, "FIRST_HOP_GRACE_SECONDS", 0.2)
    saga = Saga()
    await started(orchestrator, saga)
    body = json.dumps({"request_id": "t9", "topics": ["order", "payment"], "product_id": 1})

    await broker.publish("order", body.encode(), message_id="t9:0:order")
    async with asyncio.timeout(BOUND):
        await broker.join()

    [dead] = broker.dead_letters
    assert dead.reason.startswith("no such saga")
    assert saga.calls == []
    assert await orchestrator.store.get("Booking", "t9") is None


# --- the kind a facade runs as ----------------------------------------------------------


def async_flow(saga: Saga) -> AsyncFacade[OrderDTO]:
    flow = AsyncFacade(dto=OrderDTO)
    flow.use("order", saga.create_order).use("payment", saga.create_payment)
    return flow.consume_rollback("cancel", saga.cancel)


def running_as(kind: str) -> SagaSettings:
    return SagaSettings.model_validate({"facades": {"Booking": {"run_as": kind}}})


async def test_an_async_facade_run_as_throttling_answers_with_the_final_dto(
    broker: InMemoryBroker,
) -> None:
    saga = Saga()
    orchestrator = Orchestrator(broker, heartbeat_seconds=60, sagas=running_as("throttling"))
    flow = async_flow(saga)
    orchestrator.register_async_facade("Booking", flow)
    try:
        await orchestrator.start()
        async with asyncio.timeout(BOUND):
            dto = await flow.run("k1", OrderDTO(request_id="k1", product_id=4))

        assert dto is not None and dto.payment_id == 41
        record = await orchestrator.store.get("Booking", "k1")
        assert record is not None and (record.kind, record.state) == ("throttling", "COMPLETED")
    finally:
        await orchestrator.close()


async def test_a_facade_run_inline_runs_its_nodes_in_the_callers_task_without_the_broker(
    broker: InMemoryBroker,
) -> None:
    saga = Saga()
    orchestrator = Orchestrator(broker, heartbeat_seconds=60, sagas=running_as("inline"))
    flow = throttling(saga)
    orchestrator.register_throttling_facade("Booking", flow)
    published: list[str] = []
    real_publish = broker.publish

    async def counted(topic: str, body: bytes, **kwargs: object) -> None:
        published.append(topic)
        await real_publish(topic, body, **kwargs)  # type: ignore[arg-type]

    broker.publish = counted  # type: ignore[method-assign]
    try:
        await orchestrator.start()
        async with asyncio.timeout(BOUND):
            dto = await flow.run("k2", OrderDTO(request_id="k2", product_id=5))

        assert (dto.order_id, dto.payment_id) == (50, 51)
        assert saga.tasks == {asyncio.current_task()}
        assert published == []
        record = await orchestrator.store.get("Booking", "k2")
        assert record is not None and (record.kind, record.state) == ("inline", "COMPLETED")
        assert record.data == dto.model_dump_json()
    finally:
        await orchestrator.close()


async def test_a_failed_inline_saga_is_rolled_back_through_its_topic_before_the_answer(
    broker: InMemoryBroker,
) -> None:
    saga = Saga(decline=True)
    orchestrator = Orchestrator(broker, heartbeat_seconds=60, sagas=running_as("inline"))
    flow = throttling(saga)
    orchestrator.register_throttling_facade("Booking", flow)
    try:
        await orchestrator.start()
        with pytest.raises(SagaFailed) as failure:
            async with asyncio.timeout(BOUND):
                await flow.run("k3", OrderDTO(request_id="k3", product_id=5))

        assert failure.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert saga.rollbacks == ["k3"]
    finally:
        await orchestrator.close()


async def book_sync(request_id: str, ctx: object) -> None:
    """A sync node: it takes the protobuf Context, which no topic carries."""


def test_a_throttling_facade_cannot_run_as_async_its_callers_need_the_outcome(
    broker: InMemoryBroker,
) -> None:
    orchestrator = Orchestrator(broker, sagas=running_as("async"))

    with pytest.raises(ValueError, match=r"sagas\.facades\.Booking\.run_as: .*'async'"):
        orchestrator.register_throttling_facade("Booking", throttling(Saga()))


def test_a_sync_facade_cannot_run_as_throttling_its_nodes_take_a_context(
    broker: InMemoryBroker,
) -> None:
    orchestrator = Orchestrator(broker, sagas=running_as("throttling"))
    flow = SyncFacade(request=BookingRequest, response=BookingSyncResponse).use(book_sync)

    with pytest.raises(ValueError, match=r"run_as: .*'throttling'.*protobuf Context"):
        orchestrator.register_sync_facade("Booking", flow)


def test_an_async_facade_cannot_be_given_a_max_in_flight(broker: InMemoryBroker) -> None:
    sagas = SagaSettings.model_validate({"facades": {"Booking": {"max_in_flight": 3}}})
    orchestrator = Orchestrator(broker, sagas=sagas)

    with pytest.raises(ValueError, match="max_length"):
        orchestrator.register_async_facade("Booking", async_flow(Saga()))


async def test_a_caller_on_one_replica_wakes_at_once_when_another_replica_ends_its_saga(
    broker: InMemoryBroker, open_store: StoreOpener
) -> None:
    here, there = await open_store(), await open_store()
    orchestrator = Orchestrator(broker, store=here, heartbeat_seconds=60)
    saga = Saga()
    saga.payment_gate = asyncio.Event()
    try:
        waiting = await caller_held_at_payment(orchestrator, saga, "r1")
        await asyncio.sleep(0.1)  # the caller waits: its last read is behind it
        loop = asyncio.get_running_loop()

        # The other replica ends the saga: its store's write, not this replica's engine.
        await pay_through(there, "r1", payment_id=77)
        written = loop.time()
        answer = await waiting

        assert answer.payment_id == 77
        # Heard through the store's change feed: a poll would take up to a second here.
        assert loop.time() - written < 0.5
    finally:
        saga.payment_gate.set()
        await orchestrator.close()


@pytest.fixture
async def on_sql(broker: InMemoryBroker, open_store: StoreOpener) -> AsyncIterator[Orchestrator]:
    """An orchestrator on a SQL store (SQLite, PostgreSQL), with its change feed."""
    orchestrator = Orchestrator(broker, store=await open_store(), heartbeat_seconds=60)
    yield orchestrator
    await orchestrator.close()


async def test_a_caller_waiting_for_its_sagas_end_reads_only_the_sagas_position(
    on_sql: Orchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole_reads = readers(monkeypatch, on_sql.store, "get")
    saga = Saga()
    saga.payment_gate = asyncio.Event()
    caller = await caller_held_at_payment(on_sql, saga, "r-reads")
    await asyncio.sleep(0.1)  # the order's end has woken the caller by now
    assert caller not in whole_reads  # its saga's position said RUNNING: wait on

    saga.payment_gate.set()
    booked_dto = await caller

    assert booked_dto.payment_id == 11  # the last step's data, which the position holds
    assert caller not in whole_reads


async def test_a_caller_whose_saga_only_this_replica_writes_reads_its_position_once(
    on_sql: Orchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    position_reads = readers(monkeypatch, on_sql.store, "position")
    flow = await started(on_sql, Saga())
    caller = asyncio.create_task(booked(flow, "r-once"))

    assert (await caller).payment_id == 11
    # The begin's check that the request is new; then each write of this replica told the
    # wait where the saga stood, and the store's feed left those writes out.
    assert position_reads.count(caller) == 1


async def test_a_write_the_feed_never_told_is_seen_at_the_next_recheck(
    on_sql: Orchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ending, "RECHECK_SECONDS", 0.2)
    saga = Saga()
    saga.payment_gate = asyncio.Event()
    try:
        waiting = await caller_held_at_payment(on_sql, saga, "r-untold")
        # Written through this orchestrator's own store object, not its engine: the feed
        # takes it for the engine's own and tells the engine nothing (as for two
        # orchestrators sharing one store object).
        await pay_through(on_sql.store, "r-untold", payment_id=55)

        assert (await waiting).payment_id == 55
    finally:
        saga.payment_gate.set()
