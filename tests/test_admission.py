"""Admission control on the in-memory broker: past a facade's `max_in_flight` or its first
topic's `max_length`, a new call is RESOURCE_EXHAUSTED at once and leaves no trace but the
metric; the facade counts as saturated meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from orchestrator.broker.memory import InMemoryBroker
from orchestrator.config import BrokerSettings, SagaSettings
from orchestrator.dto import AsyncFacadeContext
from orchestrator.errors import ResourceExhausted
from orchestrator.facade.async_ import AsyncFacade
from orchestrator.facade.sync import SyncFacade
from orchestrator.facade.throttling import ThrottlingFacade
from orchestrator.registry import Orchestrator
from orchestrator.store import InMemorySagaStore, SagaState
from pb.booking_pb2 import BookingRequest, BookingSyncResponse

BOUND = 5.0
"""Seconds any single wait in these tests may take before it fails."""


class Dto(AsyncFacadeContext):
    product_id: int = 1


class Gated:
    """A node that waits for `gate`, counting the requests it saw."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.seen: list[str] = []

    async def __call__(self, dto: Dto) -> Dto:
        self.seen.append(dto.request_id)
        await self.gate.wait()
        return dto

    async def sync(self, request_id: str, ctx: object) -> None:
        self.seen.append(request_id)
        await self.gate.wait()


def settings(**facade: object) -> SagaSettings:
    return SagaSettings.model_validate(
        {"retry_pushback_seconds": 0.3, "facades": {"Booking": facade}}
    )


@pytest.fixture
def store() -> InMemorySagaStore:
    return InMemorySagaStore()


async def orchestrator_with(
    broker: InMemoryBroker, store: InMemorySagaStore, sagas: SagaSettings
) -> Orchestrator:
    return Orchestrator(broker, store=store, heartbeat_seconds=60, sagas=sagas)


def refusals(orchestrator: Orchestrator, cause: str) -> float:
    value = orchestrator.metrics.registry.get_sample_value(
        "orchestrator_calls_refused_total", {"facade": "Booking", "cause": cause}
    )
    return value or 0.0


async def until(condition: object, what: str) -> None:
    async with asyncio.timeout(BOUND):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.fixture
async def throttled(store: InMemorySagaStore) -> AsyncIterator[tuple[Orchestrator, Gated]]:
    node = Gated()
    orchestrator = await orchestrator_with(InMemoryBroker(), store, settings(max_in_flight=2))
    flow = ThrottlingFacade(dto=Dto).use("only", node)
    orchestrator.register_throttling_facade("Booking", flow)
    await orchestrator.start()
    yield orchestrator, node
    node.gate.set()
    await orchestrator.close()


async def test_a_call_past_max_in_flight_is_refused_at_once_and_leaves_no_trace(
    throttled: tuple[Orchestrator, Gated], store: InMemorySagaStore
) -> None:
    orchestrator, node = throttled
    flow = orchestrator.get_throttling_facade("Booking")
    waiting = [asyncio.create_task(flow.run(f"a{i}", Dto(request_id=f"a{i}"))) for i in range(2)]
    await until(lambda: len(node.seen) == 2, "both calls running")

    with pytest.raises(ResourceExhausted) as refused:
        await flow.run("a2", Dto(request_id="a2"))

    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.retry_after == 0.3
    assert await store.get("Booking", "a2") is None
    assert node.seen == ["a0", "a1"]
    assert refusals(orchestrator, "max_in_flight") == 1
    node.gate.set()
    async with asyncio.timeout(BOUND):
        assert [dto.request_id for dto in await asyncio.gather(*waiting)] == ["a0", "a1"]


async def test_a_facade_at_max_in_flight_is_saturated_until_a_call_ends(
    throttled: tuple[Orchestrator, Gated],
) -> None:
    orchestrator, node = throttled
    flow = orchestrator.get_throttling_facade("Booking")
    heard: list[bool] = []
    orchestrator.on_saturation(heard.append)
    waiting = [asyncio.create_task(flow.run(f"s{i}", Dto(request_id=f"s{i}"))) for i in range(2)]
    await until(lambda: len(node.seen) == 2, "both calls running")

    assert orchestrator.saturated == ["Booking"]
    node.gate.set()
    async with asyncio.timeout(BOUND):
        await asyncio.gather(*waiting)

    assert orchestrator.saturated == []
    assert heard == [True, False]


async def test_a_sync_facade_is_bounded_by_max_in_flight_too(store: InMemorySagaStore) -> None:
    node = Gated()
    orchestrator = await orchestrator_with(InMemoryBroker(), store, settings(max_in_flight=1))
    flow = SyncFacade(request=BookingRequest, response=BookingSyncResponse).use(
        node.sync, name="only"
    )
    orchestrator.register_sync_facade("Booking", flow)
    try:
        await orchestrator.start()
        first = asyncio.create_task(flow.run("y0", BookingRequest(ProductID=1)))
        await until(lambda: node.seen == ["y0"], "the first call running")

        with pytest.raises(ResourceExhausted):
            await flow.run("y1", BookingRequest(ProductID=1))

        assert await store.get("Booking", "y1") is None
        node.gate.set()
        async with asyncio.timeout(BOUND):
            await first
    finally:
        node.gate.set()
        await orchestrator.close()


async def test_a_call_whose_first_topic_is_full_is_refused_and_leaves_no_trace(
    store: InMemorySagaStore,
) -> None:
    node = Gated()
    broker = InMemoryBroker(
        BrokerSettings.model_validate({"topics": {"only": {"concurrency": 1, "max_length": 2}}})
    )
    orchestrator = await orchestrator_with(broker, store, settings())
    flow = AsyncFacade(dto=Dto).use("only", node)
    orchestrator.register_async_facade("Booking", flow)
    try:
        await orchestrator.start()
        # One hop handled (held at the gate), two waiting: the queue is full.
        await flow.run("q0", Dto(request_id="q0"))
        await until(lambda: node.seen == ["q0"], "the first hop held")
        for i in (1, 2):
            await flow.run(f"q{i}", Dto(request_id=f"q{i}"))
        assert broker.depth("only") == 2

        with pytest.raises(ResourceExhausted) as refused:
            await flow.run("q3", Dto(request_id="q3"))

        assert refused.value.retry_after == 0.3
        assert "'only' is full" in str(refused.value)
        assert await store.get("Booking", "q3") is None
        assert refusals(orchestrator, "queue_full") == 1
        # Saturated for the pushback's time, then not.
        assert orchestrator.saturated == ["Booking"]
        await until(lambda: orchestrator.saturated == [], "saturation over")
        node.gate.set()
        async with asyncio.timeout(BOUND):
            for i in range(3):
                assert (await flow.wait_for(f"q{i}")).state == SagaState.COMPLETED
        assert node.seen == ["q0", "q1", "q2"]
    finally:
        node.gate.set()
        await orchestrator.close()


async def test_a_hop_whose_next_topic_is_full_waits_for_room_without_spending_its_deliveries(
    store: InMemorySagaStore,
) -> None:
    first, second = Gated(), Gated()
    first.gate.set()
    broker = InMemoryBroker(
        BrokerSettings.model_validate(
            {
                "delivery_limit": 2,
                "topics": {"second": {"concurrency": 1, "max_length": 1}},
            }
        )
    )
    orchestrator = await orchestrator_with(broker, store, settings())
    flow = AsyncFacade(dto=Dto).use("first", first).use("second", second)
    orchestrator.register_async_facade("Booking", flow)
    try:
        await orchestrator.start()
        for i in range(4):
            await flow.run(f"h{i}", Dto(request_id=f"h{i}"))
        await until(lambda: len(second.seen) == 1 and broker.depth("second") == 1, "backed up")
        await asyncio.sleep(0.3)  # the other hops retry their publish meanwhile
        second.gate.set()
        async with asyncio.timeout(BOUND):
            for i in range(4):
                assert (await flow.wait_for(f"h{i}")).state == SagaState.COMPLETED
        assert broker.dead_letters == []
    finally:
        second.gate.set()
        await orchestrator.close()
