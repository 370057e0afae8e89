"""AsyncFacade on the in-memory broker: hops through topics, rollback, poison messages."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from orchestrator import (
    AsyncFacade,
    AsyncFacadeContext,
    BrokerSettings,
    BrokerUnavailable,
    Failure,
    InMemoryBroker,
    Orchestrator,
    Rollback,
)


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
        self.ended: list[tuple[OrderDTO, Failure | None]] = []
        self.done = asyncio.Event()

    async def create_order(self, dto: OrderDTO) -> OrderDTO:
        self.calls.append(("create_order", dto.current_index))
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
        self.done.set()

    async def on_end(self, dto: OrderDTO, failure: Failure | None) -> None:
        self.ended.append((dto, failure))
        if failure is None:
            self.done.set()


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker(BrokerSettings(redelivery_delay_seconds=0.001, delivery_limit=3))


@pytest.fixture
async def orchestrator(broker: InMemoryBroker) -> AsyncIterator[Orchestrator]:
    orchestrator = Orchestrator(broker)
    yield orchestrator
    await orchestrator.close()


async def started(orchestrator: Orchestrator, saga: Saga) -> AsyncFacade[OrderDTO]:
    flow = AsyncFacade(dto=OrderDTO)
    flow.use("order", saga.create_order).use("payment", saga.create_payment)
    flow.consume_rollback("cancel", saga.cancel).on_end(saga.on_end)
    orchestrator.register_async_facade("AsyncOrder", flow)
    await orchestrator.start()
    return flow


async def test_the_dto_passes_through_every_node_in_order(orchestrator: Orchestrator) -> None:
    saga = Saga()
    flow = await started(orchestrator, saga)

    await flow.run("a1", OrderDTO(request_id="a1", product_id=3))
    await asyncio.wait_for(saga.done.wait(), 5)

    assert saga.calls == [("create_order", 0), ("create_payment", 1)]
    [(dto, failure)] = saga.ended
    assert failure is None
    assert (dto.order_id, dto.payment_id) == (30, 31)


async def test_run_fills_in_the_routing_slip(orchestrator: Orchestrator) -> None:
    saga = Saga()
    flow = await started(orchestrator, saga)

    await flow.run("a2", OrderDTO(request_id="ignored", product_id=1))
    await asyncio.wait_for(saga.done.wait(), 5)

    dto, _ = saga.ended[0]
    assert dto.request_id == "a2"
    assert dto.topics == ["order", "payment"]
    assert dto.rollback_topic == "cancel"
    assert dto.current_index == 2


async def test_a_raising_node_rolls_back_with_the_dto(orchestrator: Orchestrator) -> None:
    saga = Saga(fail_payment=True)
    flow = await started(orchestrator, saga)

    await flow.run("a3", OrderDTO(request_id="a3", product_id=2))
    await asyncio.wait_for(saga.done.wait(), 5)

    [rollback] = saga.rollbacks
    assert (rollback.request_id, rollback.kind, rollback.failed_step) == (
        "a3",
        "async",
        "create_payment",
    )
    assert rollback.code == "INTERNAL"
    assert rollback.data["order_id"] == 20
    assert saga.ended[0][1] is not None


async def publish_raw(broker: InMemoryBroker, topic: str, body: bytes) -> None:
    await broker.publish(topic, body, message_id="poison")
    await asyncio.wait_for(broker.join(), 5)


async def test_malformed_json_is_dead_lettered_with_its_reason(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    saga = Saga()
    await started(orchestrator, saga)

    await publish_raw(broker, "order", b"{not json")

    [dead] = broker.dead_letters
    assert dead.topic == "order" and dead.reason.startswith("malformed JSON")
    assert saga.calls == [] and saga.rollbacks == []


async def test_a_wrong_schema_is_dead_lettered_and_its_saga_rolled_back(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    saga = Saga()
    await started(orchestrator, saga)
    body = {"request_id": "a4", "topics": ["order", "payment"], "product_id": "many"}

    await publish_raw(broker, "order", json.dumps(body).encode())

    [dead] = broker.dead_letters
    assert dead.reason.startswith("schema: product_id")
    assert [r.request_id for r in saga.rollbacks] == ["a4"]
    assert saga.calls == []


async def test_an_out_of_range_topic_index_is_dead_lettered_and_rolled_back(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    saga = Saga()
    await started(orchestrator, saga)
    body = {"request_id": "a5", "topics": ["order", "payment"], "current_index": 7, "product_id": 1}

    await publish_raw(broker, "payment", json.dumps(body).encode())

    [dead] = broker.dead_letters
    assert "topic index 7" in dead.reason
    assert [r.request_id for r in saga.rollbacks] == ["a5"]


async def test_a_message_without_a_readable_request_id_is_only_dead_lettered(
    orchestrator: Orchestrator, broker: InMemoryBroker
) -> None:
    saga = Saga()
    await started(orchestrator, saga)

    await publish_raw(broker, "order", b'["a", "list"]')

    assert len(broker.dead_letters) == 1
    assert saga.rollbacks == []


async def test_a_hop_whose_publish_fails_is_redelivered(
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
    await asyncio.wait_for(saga.done.wait(), 5)

    assert saga.calls == [("create_order", 0), ("create_order", 0), ("create_payment", 1)]


def test_the_rollback_topic_must_be_the_one_the_facade_publishes_to() -> None:
    flow = AsyncFacade(dto=OrderDTO)
    with pytest.raises(ValueError, match="publishes rollbacks to 'cancel'"):
        flow.consume_rollback("other", Saga().cancel)


def test_a_topic_is_used_once_per_facade() -> None:
    saga = Saga()
    flow = AsyncFacade(dto=OrderDTO).use("order", saga.create_order)
    with pytest.raises(ValueError, match="already used"):
        flow.use("order", saga.create_payment)


async def test_a_facade_without_nodes_cannot_start(orchestrator: Orchestrator) -> None:
    orchestrator.register_async_facade("Empty", AsyncFacade(dto=OrderDTO))
    with pytest.raises(ValueError, match="no nodes"):
        await orchestrator.start()


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
    await asyncio.wait_for(saga.done.wait(), 10)

    assert broker.dead_letters == []
    assert saga.calls[-1] == ("create_payment", 1)
