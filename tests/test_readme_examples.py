"""The development guide's three-step facades, run exactly as README.md shows them.

Each example block follows a `<!-- example: NAME -->` marker. The test
compiles that block verbatim into a module of its own, registers the facade
it defines on an Orchestrator, and books trips against the real Order and
Payment services: the sync one on the in-memory broker, the async one
through RabbitMQ. A trip either ends with two orders and a payment, or with
both orders cancelled and nothing paid; the saga's journal says which steps
were undone.
"""

from __future__ import annotations

import asyncio
import re
import sys
import types
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from node import Upstreams
from orchestrator import Orchestrator
from orchestrator.broker import InMemoryBroker
from orchestrator.broker.rabbitmq import RabbitMQBroker
from orchestrator.config import BrokerSettings
from orchestrator.errors import SagaFailed
from orchestrator.store import CompensationState, SagaState
from pb.booking_pb2 import BookingRequest
from tests.support.app_fixtures import Upstreams as RunningUpstreams
from tests.support.broker_fixtures import delete_topology
from upstream.ledger import CANCELLED, CREATED, PAID

README = Path(__file__).resolve().parent.parent / "README.md"
MAX_LINES = 40
_EXAMPLE = re.compile(
    r"<!-- example: (?P<name>[\w-]+)[^>]*-->\s*```python\n(?P<code>.*?)^```", re.S | re.M
)


def example(name: str) -> str:
    """The code of README's example `name`."""
    found = {m["name"]: m["code"] for m in _EXAMPLE.finditer(README.read_text())}
    assert name in found, f"README.md has no example {name!r} (it has {sorted(found)})"
    return found[name]


@pytest.fixture
def load_example() -> Iterator[Any]:
    """Compile an example into a module of its own (so its pydantic models resolve)."""
    loaded: list[str] = []

    def load(name: str) -> types.ModuleType:
        module = types.ModuleType(f"readme_example_{name.replace('-', '_')}")
        sys.modules[module.__name__] = module
        loaded.append(module.__name__)
        exec(compile(example(name), f"README.md:{name}", "exec"), module.__dict__)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


@pytest.fixture
async def clients(upstreams: RunningUpstreams) -> AsyncIterator[Upstreams]:
    clients = Upstreams.connect(
        order_address=upstreams.order.target,
        payment_address=upstreams.payment.target,
        timeout_seconds=5,
    )
    yield clients
    await clients.close()


def statuses(upstreams: RunningUpstreams, request_id: str) -> tuple[list[str], list[str]]:
    """The statuses of `request_id`'s orders and payments, oldest first."""
    orders = [order.status for order in upstreams.order.ledger.orders_of(request_id)]
    payments = [payment.status for payment in upstreams.payment.ledger.payments_of(request_id)]
    return orders, payments


@pytest.mark.parametrize("name", ["sync-trip", "async-trip"])
def test_the_example_fits_in_forty_lines(name: str) -> None:
    assert len(example(name).splitlines()) <= MAX_LINES


async def test_the_sync_trip_books_a_flight_a_hotel_and_pays(
    load_example: Any, clients: Upstreams, upstreams: RunningUpstreams
) -> None:
    orchestrator = Orchestrator(InMemoryBroker())
    load_example("sync-trip").register_trip(orchestrator, clients)
    await orchestrator.start()
    try:
        flow = orchestrator.get_sync_facade("TripBooking")
        response = await flow.run("trip-1", BookingRequest(ProductID=1))
        saga = await orchestrator.store.get("TripBooking", "trip-1")
    finally:
        await orchestrator.close()

    assert response.OrderID > 0 and response.PaymentID > 0
    assert statuses(upstreams, "trip-1") == ([CREATED, CREATED], [PAID])
    assert saga is not None and saga.state == SagaState.COMPLETED


async def test_the_sync_trip_declined_cancels_the_flight_and_the_hotel(
    load_example: Any, clients: Upstreams, upstreams: RunningUpstreams
) -> None:
    orchestrator = Orchestrator(InMemoryBroker())
    load_example("sync-trip").register_trip(orchestrator, clients)
    await orchestrator.start()
    try:
        flow = orchestrator.get_sync_facade("TripBooking")
        with pytest.raises(SagaFailed) as failed:
            await flow.run("trip-2", BookingRequest(ProductID=1, FaultInject=True))
        async with asyncio.timeout(10):
            saga = await flow.wait_for("trip-2")
    finally:
        await orchestrator.close()

    assert failed.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert saga.state == SagaState.COMPENSATED
    assert [step.compensation for step in saga.steps] == [
        CompensationState.DONE,
        CompensationState.DONE,
        CompensationState.NONE,
    ]
    assert statuses(upstreams, "trip-2") == ([CANCELLED, CANCELLED], [])


@pytest.fixture
async def rabbit_orchestrator(rabbitmq_url: str) -> AsyncIterator[Orchestrator]:
    settings = BrokerSettings.model_validate(
        {"url": rabbitmq_url, "topic_prefix": f"t{uuid.uuid4().hex[:12]}."}
    )
    broker = RabbitMQBroker(settings)
    orchestrator = Orchestrator(broker)
    yield orchestrator
    await orchestrator.close()
    await delete_topology(settings, broker.declared_topics)


@pytest.mark.broker
async def test_the_async_trip_books_through_rabbitmq(
    load_example: Any,
    clients: Upstreams,
    upstreams: RunningUpstreams,
    rabbit_orchestrator: Orchestrator,
) -> None:
    module = load_example("async-trip")
    module.register_async_trip(rabbit_orchestrator, clients)
    await rabbit_orchestrator.start()
    flow = rabbit_orchestrator.get_async_facade("AsyncTripBooking")

    await flow.run("trip-3", module.TripDTO(request_id="trip-3"))
    await flow.run("trip-4", module.TripDTO(request_id="trip-4", decline=True))
    async with asyncio.timeout(20):
        booked = await flow.wait_for("trip-3")
        declined = await flow.wait_for("trip-4")

    assert booked.state == SagaState.COMPLETED
    assert statuses(upstreams, "trip-3") == ([CREATED, CREATED], [PAID])
    assert declined.state == SagaState.COMPENSATED
    assert statuses(upstreams, "trip-4") == ([CANCELLED, CANCELLED], [])
