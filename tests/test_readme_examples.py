"""The development guide's examples, run exactly as README.md shows them.

Each example block follows a `<!-- example: NAME -->` marker. The trip
facades' blocks are compiled verbatim into a module of their own, whose
facade is registered on an Orchestrator that books trips against the real
Order and Payment services: the sync one on the test kit's in-memory broker,
the async one through RabbitMQ. A trip either ends with two orders and a
payment, or with both orders cancelled and nothing paid; the saga's journal
says which steps were undone. The testing section's block is a user's test
module: it is written to a file and run by a pytest of its own.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import types
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from node import Upstreams
from orchestrator.broker.rabbitmq import RabbitMQBroker
from orchestrator.config import BrokerSettings
from orchestrator.registry import Orchestrator
from orchestrator.store import SagaState
from orchestrator.testing import SagaKit, assert_saga
from pb.booking_pb2 import BookingRequest
from tests.support.app_fixtures import Upstreams as RunningUpstreams
from tests.support.broker_fixtures import delete_topology
from upstream.ledger import CANCELLED, CREATED, PAID

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
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
    register = load_example("sync-trip").register_trip
    async with SagaKit(lambda orchestrator: register(orchestrator, clients)) as kit:
        run = await kit.run("TripBooking", "trip-1", BookingRequest(ProductID=1))

    assert run.response is not None
    assert run.response.OrderID > 0 and run.response.PaymentID > 0
    assert statuses(upstreams, "trip-1") == ([CREATED, CREATED], [PAID])
    assert_saga(run, state="COMPLETED", done=["book_flight", "book_hotel", "pay"])


async def test_the_sync_trip_declined_cancels_the_flight_and_the_hotel(
    load_example: Any, clients: Upstreams, upstreams: RunningUpstreams
) -> None:
    register = load_example("sync-trip").register_trip
    async with SagaKit(lambda orchestrator: register(orchestrator, clients)) as kit:
        run = await kit.run("TripBooking", "trip-2", BookingRequest(ProductID=1, FaultInject=True))

    assert run.failure is not None and run.failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert_saga(run, state="COMPENSATED", failed="pay", compensated=["book_flight", "book_hotel"])
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


def test_the_testing_example_passes_as_a_users_own_test_module(tmp_path: Path) -> None:
    (tmp_path / "test_trip_facade.py").write_text(example("testing-a-facade"))

    done = subprocess.run(
        [
            sys.executable,
            *("-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto"),
            *("-o", "asyncio_default_fixture_loop_scope=function"),
            "test_trip_facade.py",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
