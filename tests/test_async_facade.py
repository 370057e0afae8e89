"""AsyncFacade on the in-memory broker: hops through topics, rollback, and what the journal
lets a hop message do (run, be dropped as a duplicate, or be dead-lettered)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping

import pytest

from orchestrator import (
    AsyncFacade,
    AsyncFacadeContext,
    Orchestrator,
    Rollback,
    idempotency_key,
    step_metadata,
)
from orchestrator.broker import InMemoryBroker
from orchestrator.config import BrokerSettings
from orchestrator.errors import BrokerUnavailable
from orchestrator.store import SagaRecord, SagaState, StepEnded

BOUND = 5.0
"""Seconds any single wait in these tests may take before it fails."""


class OrderDTO(AsyncFacadeContext):
    product_id: int
    order_id: int = 0
    payment_id: int = 0


class Saga:
    """Nodes and a rollback node that record what they saw."""

    def __init__(self, *, fail_payment: bool = False) -> None:
        self.fail_payment = fail_payment
        self.calls: list[tuple[str, int]] = []
        self.rollbacks: list[Rollback] = []
        self.order_entered = asyncio.Event()
        self.order_gate: asyncio.Event | None = None
        """When set to an event, create_order waits for it."""

    async def create_order(self, dto: OrderDTO) -> OrderDTO:
        self.calls.append(("create_order", dto.current_index))
        self.order_entered.set()
        if self.order_gate is not None:
            await self.order_gate.wait()
        dto.order_id = dto.product_id * 10
        return dto

    async def create_payment(self, dto: OrderDTO) -> OrderDTO:
        self.calls.append(("create_payment", dto.current_index))
        if self.fail_payment:
            raise RuntimeError("declined")
        dto.payment_id = dto.order_id + 1
        return dto

    async def cancel(self, rollback: Rollback) -> None:
        self.rollbacks.append(rollback)


class LosingBroker(InMemoryBroker):
    """An in-memory broker that confirms, then loses, the publishes to the topics in `lose`."""

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__(settings)
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
        if topic in self.lose:
            return
        await super().publish(topic, body, message_id=message_id, headers=headers)


@pytest.fixture
def broker() -> LosingBroker:
    return LosingBroker(BrokerSettings(redelivery_delay_seconds=0.001, delivery_limit=3))


@pytest.fixture
async def orchestrator(broker: InMemoryBroker) -> AsyncIterator[Orchestrator]:
    orchestrator = Orchestrator(broker, heartbeat_seconds=60)
    yield orchestrator
    await orchestrator.close()


async def started(orchestrator: Orchestrator, saga: Saga) -> AsyncFacade[OrderDTO]:
    flow = AsyncFacade(dto=OrderDTO)
    flow.use("order", saga.create_order).use("payment", saga.create_payment)
    flow.consume_rollback("cancel", saga.cancel)
    orchestrator.register_async_facade("AsyncOrder", flow)
    await orchestrator.start()
    return flow


async def ended(flow: AsyncFacade[OrderDTO], request_id: str) -> SagaRecord:
    """The saga of `request_id` once it is finished (within BOUND seconds)."""
    async with asyncio.timeout(BOUND):
        return await flow.wait_for(request_id)


async def record(orchestrator: Orchestrator, request_id: str) -> SagaRecord | None:
    return await orchestrator.store.get("AsyncOrder", request_id)


def refused(orchestrator: Orchestrator, topic: str, reason: str) -> float:
    """How many messages of `topic` the journal did not let act, for `reason`."""
    labels = {"facade": "AsyncOrder", "topic": topic, "reason": reason}
    value = orchestrator.metrics.registry.get_sample_value(
        "orchestrator_messages_refused_total", labels
    )
    return value or 0.0


async def until(condition: Callable[[], object], what: str) -> None:
    """Wait (bounded) until `condition()` is true: a dead letter or a metric, which no
    event announces."""
    try:
        async with asyncio.timeout(BOUND):
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
    except TimeoutError:
        pytest.fail(f"still not {what} after {BOUND}s")


async def settled(broker: InMemoryBroker) -> None:
    """Wait until the broker has handled every message."""
    await asyncio.wait_for(broker.join(), BOUND)


async def test_the_dto_passes_through_every_node_in_order(orchestrator: Orchestrator) -> None:
    saga = Saga()
    flow = await started(orchestrator, saga)

    await flow.run("a1", OrderDTO(request_id="a1", product_id=3))
    done = await ended(flow, "a1")

    assert done.state == SagaState.COMPLETED
    assert saga.calls == [("create_order", 0), ("create_payment", 1)]
    dto = OrderDTO.model_validate_json(done.data)
    assert (dto.order_id, dto.payment_id) == (30, 31)


async def test_run_fills_in_the_routing_slip(orchestrator: Orchestrator) -> None:
    saga = Saga()
    flow = await started(orchestrator, saga)

    await flow.run("a2", OrderDTO(request_id="ignored", product_id=1))
    done = await ended(flow, "a2")

    dto = OrderDTO.model_validate_json(done.data)
    assert dto.request_id == "a2"
    assert dto.topics == ["order", "payment"]
    assert dto.rollback_topic == "cancel"
    assert dto.current_index == 2


async def test_a_raising_node_rolls_back_with_the_dto(orchestrator: Orchestrator) -> None:
    saga = Saga(fail_payment=True)
    flow = await started(orchestrator, saga)

    await flow.run("a3", OrderDTO(request_id="a3", product_id=2))
    done = await ended(flow, "a3")

    [rollback] = saga.rollbacks
    assert (rollback.request_id, rollback.kind, rollback.failed_step) == (
        "a3",
        "async",
        "create_payment",
    )
    assert rollback.code == "INTERNAL"
    assert rollback.data["order_id"] == 20
    assert (done.state, done.error_code) == (SagaState.COMPENSATED, "INTERNAL")


async def test_an_async_node_runs_under_the_idempotency_key_of_its_step(
    orchestrator: Orchestrator,
) -> None:
    seen: list[tuple[tuple[tuple[str, str], ...], str]] = []

    async def create_order(dto: OrderDTO) -> OrderDTO:
        seen.append((step_metadata(), idempotency_key()))
        return dto

    flow = AsyncFacade(dto=OrderDTO).use("order", create_order)
    orchestrator.register_async_facade("AsyncOrder", flow)
    await orchestrator.start()
    await flow.run("a8", OrderDTO(request_id="a8", product_id=1))
    await ended(flow, "a8")

    key = "AsyncOrder:a8:create_order"
    assert seen == [((("x-request-id", "a8"), ("x-idempotency-key", key)), key)]


async def publish_raw(broker: InMemoryBroker, topic: str, body: bytes) -> None:
    await broker.publish(topic, body, message_id="poison")
    await settled(broker)


async def test_malformed_json_is_dead_lettered_with_its_reason(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    saga = Saga()
    await started(orchestrator, saga)

    await publish_raw(broker, "order", b"{not json")

    [dead] = broker.dead_letters
    assert dead.topic == "order" and dead.reason.startswith("malformed JSON")
    assert saga.calls == [] and saga.rollbacks == []


async def test_a_wrong_schema_is_dead_lettered_and_its_saga_runs_on(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    saga = Saga()
    saga.order_gate = asyncio.Event()
    flow = await started(orchestrator, saga)
    await flow.run("a4", OrderDTO(request_id="a4", product_id=1))
    await asyncio.wait_for(saga.order_entered.wait(), BOUND)
    body = {"request_id": "a4", "topics": ["order", "payment"], "product_id": "many"}

    await broker.publish("payment", json.dumps(body).encode(), message_id="poison")
    await until(lambda: broker.dead_letters, "dead-lettered")
    saga.order_gate.set()
    done = await ended(flow, "a4")

    [dead] = broker.dead_letters
    assert dead.reason.startswith("schema: product_id")
    assert done.state == SagaState.COMPLETED
    assert saga.rollbacks == []
    assert saga.calls == [("create_order", 0), ("create_payment", 1)]


async def test_a_hop_for_an_unknown_saga_is_dead_lettered_and_calls_no_node(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    saga = Saga()
    await started(orchestrator, saga)
    body = {"request_id": "a5", "topics": ["order", "payment"], "current_index": 1, "product_id": 1}

    await publish_raw(broker, "payment", json.dumps(body).encode())

    [dead] = broker.dead_letters
    assert dead.topic == "payment" and dead.reason.startswith("no such saga")
    assert saga.calls == [] and saga.rollbacks == []
    assert await record(orchestrator, "a5") is None
    assert refused(orchestrator, "payment", "dead_lettered") == 1


async def test_a_message_without_a_readable_request_id_is_only_dead_lettered(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    saga = Saga()
    await started(orchestrator, saga)

    await publish_raw(broker, "order", b'["a", "list"]')

    assert len(broker.dead_letters) == 1
    assert saga.rollbacks == []


async def test_a_hop_for_a_finished_saga_is_dropped_and_changes_nothing(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    saga = Saga()
    flow = await started(orchestrator, saga)
    await flow.run("a9", OrderDTO(request_id="a9", product_id=1))
    done = await ended(flow, "a9")
    await settled(broker)

    await publish_raw(broker, "order", done.payload.encode())

    assert broker.dead_letters == []
    assert saga.calls == [("create_order", 0), ("create_payment", 1)]
    assert await record(orchestrator, "a9") == done
    assert refused(orchestrator, "order", "duplicate") == 1


async def test_a_hop_whose_body_differs_from_the_journal_is_dead_lettered(
    orchestrator: Orchestrator, broker: LosingBroker
) -> None:
    saga = Saga()
    flow = await started(orchestrator, saga)
    broker.lose.add("payment")  # the saga waits at create_payment for a hop that never comes
    await flow.run("a10", OrderDTO(request_id="a10", product_id=1))
    await settled(broker)
    waiting = await record(orchestrator, "a10")
    assert waiting is not None and waiting.current_step is not None
    assert waiting.current_step.name == "create_payment"
    forged = OrderDTO.model_validate_json(waiting.data)
    forged.order_id = 999
    broker.lose.clear()

    await publish_raw(broker, "payment", forged.model_dump_json().encode())

    [dead] = broker.dead_letters
    assert dead.topic == "payment"
    assert dead.reason.startswith("the message does not match the saga's record")
    assert saga.calls == [("create_order", 0)]
    assert await record(orchestrator, "a10") == waiting


async def test_a_redelivered_hop_the_journal_shows_just_finished_republishes_its_outcome(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    saga = Saga()
    flow = await started(orchestrator, saga)
    real_publish = broker.publish
    refusals = 1

    async def flaky(topic: str, body: bytes, **kwargs: object) -> None:
        nonlocal refusals
        if topic == "payment" and refusals:
            refusals -= 1
            raise ConnectionError("broker hiccup")
        await real_publish(topic, body, **kwargs)  # type: ignore[arg-type]

    broker.publish = flaky  # type: ignore[method-assign]
    await flow.run("a6", OrderDTO(request_id="a6", product_id=1))
    done = await ended(flow, "a6")

    assert done.state == SagaState.COMPLETED
    assert saga.calls == [("create_order", 0), ("create_payment", 1)]
    assert [(step.name, step.attempts) for step in done.steps] == [
        ("create_order", 1),
        ("create_payment", 1),
    ]


async def test_a_duplicate_of_a_hop_running_on_this_replica_is_dropped(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    saga = Saga()
    saga.order_gate = asyncio.Event()
    flow = await started(orchestrator, saga)
    await flow.run("a11", OrderDTO(request_id="a11", product_id=1))
    await asyncio.wait_for(saga.order_entered.wait(), BOUND)
    running = await record(orchestrator, "a11")
    assert running is not None

    await broker.publish("order", running.payload.encode(), message_id="a11:0:order")
    await until(lambda: refused(orchestrator, "order", "duplicate") == 1, "dropped")
    saga.order_gate.set()
    done = await ended(flow, "a11")

    assert done.state == SagaState.COMPLETED
    assert saga.calls == [("create_order", 0), ("create_payment", 1)]
    assert done.steps[0].attempts == 1
    await settled(broker)
    assert broker.dead_letters == []


async def test_a_hop_another_replica_made_current_runs_though_this_replica_wrote_otherwise(
    orchestrator: Orchestrator, broker: LosingBroker
) -> None:
    saga = Saga()
    flow = await started(orchestrator, saga)
    broker.lose = {"order"}  # the first hop goes to the other replica
    await flow.run("a12", OrderDTO(request_id="a12", product_id=1))  # this replica's begin
    began = await record(orchestrator, "a12")
    assert began is not None
    # The other replica runs create_order, records it and publishes the next hop, all within
    # the second this replica trusts its own write of the saga's position.
    ordered = OrderDTO.model_validate_json(began.payload)
    ordered.order_id, ordered.current_index = 10, 1
    body = ordered.model_dump_json()
    change = StepEnded(0, body, next_step="create_payment")
    assert await orchestrator.store.apply("AsyncOrder", "a12", change)

    await publish_raw(broker, "payment", body.encode())
    done = await ended(flow, "a12")

    assert done.state == SagaState.COMPLETED
    assert saga.calls == [("create_payment", 1)]
    assert broker.dead_letters == []


def test_the_rollback_topic_is_given_once_in_consume_rollback() -> None:
    flow = AsyncFacade(dto=OrderDTO).consume_rollback("cancel", Saga().cancel)

    assert flow.rollback_topic == "cancel"
    with pytest.raises(ValueError, match="already consumed from 'cancel'"):
        flow.consume_rollback("other", Saga().cancel)


def test_a_topic_is_used_once_per_facade() -> None:
    saga = Saga()
    flow = AsyncFacade(dto=OrderDTO).use("order", saga.create_order)
    with pytest.raises(ValueError, match="already used"):
        flow.use("order", saga.create_payment)


def test_a_plain_def_node_is_refused_at_use_naming_it() -> None:
    def create_order(dto: OrderDTO) -> OrderDTO:
        return dto

    with pytest.raises(TypeError, match=r"node 'create_order' must be an async def"):
        AsyncFacade(dto=OrderDTO).use("order", create_order)  # type: ignore[arg-type]


def test_a_compensation_of_the_wrong_shape_is_refused_at_use_naming_its_step() -> None:
    async def undo(dto: OrderDTO, reason: str) -> None:
        pass

    with pytest.raises(TypeError, match=r"compensation of 'create_order' must take \(dto\)"):
        AsyncFacade(dto=OrderDTO).use("order", Saga().create_order, compensate=undo)  # type: ignore[arg-type]


async def test_an_async_facade_without_nodes_cannot_be_registered(
    orchestrator: Orchestrator,
) -> None:
    with pytest.raises(ValueError, match="a facade needs at least one node"):
        orchestrator.register_async_facade("Empty", AsyncFacade(dto=OrderDTO))


async def test_a_hop_failing_while_the_broker_is_down_does_not_spend_the_delivery_limit(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    saga = Saga()
    flow = await started(orchestrator, saga)
    real_publish = broker.publish
    refusals = 5  # more than the delivery limit of 3

    async def down(topic: str, body: bytes, **kwargs: object) -> None:
        nonlocal refusals
        if topic == "payment" and refusals:
            refusals -= 1
            raise BrokerUnavailable("broker restarting")
        await real_publish(topic, body, **kwargs)  # type: ignore[arg-type]

    broker.publish = down  # type: ignore[method-assign]
    await flow.run("a7", OrderDTO(request_id="a7", product_id=1))
    done = await ended(flow, "a7")

    assert broker.dead_letters == []
    assert done.state == SagaState.COMPLETED
    assert saga.calls[-1] == ("create_payment", 1)
