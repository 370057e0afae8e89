"""The journal governs the async booking saga on a real RabbitMQ: no message acts on its own.

The booking service runs in process with a SQLite journal, its upstreams are
the real Order and Payment services over gRPC, and every write to their
ledgers is counted. Messages are forged, replayed and duplicated through the
real broker; each test is judged from the ledgers and the journal: every saga
ends COMPLETED, COMPENSATED or COMPENSATION_FAILED, no effect happens twice,
no effect happens for a saga that does not exist, queues end empty.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aio_pika
import grpc
import pytest

from main import AppSettings, BookingApp
from main import running_app as run_booking_app
from orchestrator.broker.rabbitmq import RabbitMQBroker
from orchestrator.config import BrokerSettings
from orchestrator.store import SagaRecord, SagaState, StepState
from pb import booking_pb2, booking_pb2_grpc
from tests.support.app_fixtures import Upstreams, app_settings
from tests.support.sagas import Load, Outcome, kept_dead_letters, outcome_of
from tests.test_booking_async import queues_drained
from topic import CANCEL_ASYNC_BOOKING, CREATE_ORDER, CREATE_PAYMENT

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

ASYNC_BOOKING = "AsyncBooking"
SLIP = {"topics": [CREATE_ORDER, CREATE_PAYMENT], "rollback_topic": CANCEL_ASYNC_BOOKING}


def journal_settings(
    upstreams: Upstreams, broker: BrokerSettings, tmp_path: Path, **sagas: float
) -> AppSettings:
    """The booking service on `broker`, its journal a SQLite file, recovery every 0.5 s."""
    settings = app_settings(upstreams, broker)
    return settings.model_copy(
        update={
            "store": settings.store.model_validate(
                {
                    "url": f"sqlite+aiosqlite:///{tmp_path / 'journal.db'}",
                    "heartbeat_seconds": 0.5,
                    "lease_seconds": 2,
                }
            ),
            "sagas": settings.sagas.model_validate(sagas),
        }
    )


@pytest.fixture
async def app(
    upstreams: Upstreams, rabbit_settings: BrokerSettings, tmp_path: Path
) -> AsyncIterator[BookingApp]:
    async with run_booking_app(journal_settings(upstreams, rabbit_settings, tmp_path)) as app:
        yield app


@pytest.fixture
async def booking(app: BookingApp) -> AsyncIterator[booking_pb2_grpc.BookingServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
        yield booking_pb2_grpc.BookingServiceStub(channel)


@pytest.fixture
async def forger(rabbit_settings: BrokerSettings) -> AsyncIterator[RabbitMQBroker]:
    """A client of the same broker, publishing messages the orchestrator did not."""
    broker = RabbitMQBroker(rabbit_settings)
    await broker.start()
    yield broker
    await broker.close()


async def book(
    stub: booking_pb2_grpc.BookingServiceAsyncStub, request_id: str, *, faulty: bool = False
) -> None:
    request = booking_pb2.BookingRequest(ProductID=1, Count=1, FaultInject=faulty)
    await stub.HandleAsyncBooking(request, metadata=(("x-request-id", request_id),), timeout=10)


async def finished(app: BookingApp, request_ids: Iterable[str]) -> dict[str, SagaRecord]:
    """Each saga once it has reached an end."""
    flow = app.orchestrator.get_async_facade(ASYNC_BOOKING)
    async with asyncio.timeout(60):
        return {rid: await flow.wait_for(rid) for rid in request_ids}


async def journal(app: BookingApp, request_ids: Iterable[str]) -> dict[str, SagaRecord | None]:
    """What the journal holds for each request id now."""
    store = app.orchestrator.store
    return {rid: await store.get(ASYNC_BOOKING, rid) for rid in request_ids}


def refused(app: BookingApp) -> float:
    """Messages the journal did not let act, so far (dead-lettered or dropped)."""
    family = app.orchestrator.metrics.messages_refused
    return sum(s.value for m in family.collect() for s in m.samples if s.name.endswith("_total"))


async def refused_at_least(app: BookingApp, count: float) -> None:
    async with asyncio.timeout(30):
        while refused(app) < count:  # noqa: ASYNC110 (the consumers count as they refuse)
            await asyncio.sleep(0.05)


async def dead_letters(app: BookingApp, topics: Iterable[str], count: int) -> dict[str, str]:
    """The dead letters the orchestrator kept from `topics` (at least `count`), by message
    id: their reasons."""
    kept = await kept_dead_letters(app.orchestrator, topics, count)
    return {message_id: letter.reason for message_id, letter in kept.items()}


def hop(request_id: str, index: int, **fields: Any) -> bytes:
    """A well-formed hop message, as the orchestrator would publish it for step `index`."""
    body = {"request_id": request_id, "current_index": index, **SLIP, "product_id": 1, **fields}
    return json.dumps(body).encode()


async def test_hop_messages_for_sagas_that_do_not_exist_call_nothing_and_record_nothing(
    app: BookingApp, forger: RabbitMQBroker, calls: Counter[str]
) -> None:
    await forger.publish(CREATE_ORDER, hop("ghost-1", 0), message_id="ghost-1")
    await forger.publish(CREATE_PAYMENT, hop("ghost-2", 1, order_id=7), message_id="ghost-2")
    wrong = json.dumps({**SLIP, "request_id": "ghost-3", "product_id": "lots"}).encode()
    await forger.publish(CREATE_ORDER, wrong, message_id="ghost-3")
    rollback = json.dumps({"facade": ASYNC_BOOKING, "request_id": "ghost-4"}).encode()
    await forger.publish(CANCEL_ASYNC_BOOKING, rollback, message_id="ghost-4")

    reasons = await dead_letters(app, (CREATE_ORDER, CREATE_PAYMENT, CANCEL_ASYNC_BOOKING), 4)

    assert reasons["ghost-1"].startswith("no such saga")
    assert reasons["ghost-2"].startswith("no such saga")
    assert reasons["ghost-3"].startswith("schema: product_id")
    assert reasons["ghost-4"].startswith("rollback for a saga that does not exist")
    assert calls == Counter()
    assert await journal(app, ["ghost-1", "ghost-2", "ghost-3", "ghost-4"]) == dict.fromkeys(
        ["ghost-1", "ghost-2", "ghost-3", "ghost-4"]
    )


async def test_hop_messages_for_finished_sagas_call_nothing_and_change_nothing(
    app: BookingApp,
    booking: booking_pb2_grpc.BookingServiceAsyncStub,
    forger: RabbitMQBroker,
    calls: Counter[str],
    rabbit_settings: BrokerSettings,
) -> None:
    await book(booking, "done-1")
    await book(booking, "undone-1", faulty=True)
    before = await finished(app, ["done-1", "undone-1"])
    assert before["done-1"].state == SagaState.COMPLETED
    assert before["undone-1"].state == SagaState.COMPENSATED
    calls_before, refused_before = Counter(calls), refused(app)

    for saga in before.values():  # each hop, exactly as the orchestrator published it
        await forger.publish(CREATE_ORDER, saga.payload.encode(), message_id="replay-0")
        await forger.publish(CREATE_PAYMENT, (saga.steps[0].data or "").encode(), message_id="r1")
        rollback = json.dumps({"facade": ASYNC_BOOKING, "request_id": saga.request_id})
        await forger.publish(CANCEL_ASYNC_BOOKING, rollback.encode(), message_id="replay-rb")
    altered = hop("done-1", 1, order_id=999)
    await forger.publish(CREATE_PAYMENT, altered, message_id="altered")
    wrong = json.dumps({**SLIP, "request_id": "done-1", "current_index": 1, "product_id": -5})
    await forger.publish(CREATE_PAYMENT, wrong.encode(), message_id="wrong-schema")
    await refused_at_least(app, refused_before + 8)

    assert calls == calls_before
    assert await journal(app, ["done-1", "undone-1"]) == before
    assert await dead_letters(app, (CREATE_PAYMENT,), 1) == {
        "wrong-schema": "schema: product_id: Input should be greater than 0"
    }
    assert await queues_drained(rabbit_settings) == {}


def duplicating(app: BookingApp) -> None:
    """Make the orchestrator publish every hop message twice."""
    broker = app.orchestrator.broker
    publish = broker.publish

    async def twice(topic: str, body: bytes, **kwargs: Any) -> None:
        await publish(topic, body, **kwargs)
        if topic in (CREATE_ORDER, CREATE_PAYMENT):
            await publish(topic, body, **kwargs)

    broker.publish = twice  # type: ignore[method-assign]


async def test_every_hop_of_200_sagas_published_twice_has_each_effect_once(
    app: BookingApp,
    booking: booking_pb2_grpc.BookingServiceAsyncStub,
    upstreams: Upstreams,
    rabbit_settings: BrokerSettings,
) -> None:
    duplicating(app)
    load = Load(size=200, fault_every=5)

    await load.submit(booking, concurrency=32)
    sagas = await finished(app, load.request_ids)
    await load.settle(upstreams.order.ledger, upstreams.payment.ledger)

    tally = load.tally(upstreams.order.ledger, upstreams.payment.ledger)
    assert tally[Outcome.COMPLETED] == 160 and tally[Outcome.COMPENSATED] == 40
    for rid, saga in sagas.items():
        expected = [StepState.DONE, StepState.FAILED if load.faulty(rid) else StepState.DONE]
        assert [step.state for step in saga.steps] == expected, rid
        assert [step.attempts for step in saga.steps] == [1, 1], rid
    assert await queues_drained(rabbit_settings) == {}


async def test_100_replays_of_finished_sagas_hops_have_no_effect_and_change_no_record(
    app: BookingApp,
    booking: booking_pb2_grpc.BookingServiceAsyncStub,
    forger: RabbitMQBroker,
    calls: Counter[str],
    rabbit_settings: BrokerSettings,
) -> None:
    load = Load(size=100, fault_every=4)
    await load.submit(booking, concurrency=32)
    before = await finished(app, load.request_ids)
    calls_before, refused_before = Counter(calls), refused(app)

    for rid, saga in before.items():
        await forger.publish(CREATE_ORDER, saga.payload.encode(), message_id=f"{rid}:0")
        body = (saga.steps[0].data or "").encode()
        await forger.publish(CREATE_PAYMENT, body, message_id=f"{rid}:1")
    await refused_at_least(app, refused_before + 200)

    assert calls == calls_before
    assert await journal(app, load.request_ids) == before
    assert await queues_drained(rabbit_settings) == {}


async def test_a_step_queue_deleted_mid_run_every_saga_still_ends(
    upstreams: Upstreams, rabbit_settings: BrokerSettings, tmp_path: Path
) -> None:
    # Sagas whose messages the deletion took are rolled back at their deadline; rollbacks
    # it took are run by recovery at theirs.
    settings = journal_settings(
        upstreams, rabbit_settings, tmp_path, deadline_seconds=4, compensation_seconds=4
    )
    load = Load(size=200, fault_every=5)
    async with (
        run_booking_app(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel,
    ):
        stub = booking_pb2_grpc.BookingServiceStub(channel)
        submitting = asyncio.create_task(load.submit(stub, concurrency=32))
        await asyncio.wait_for(load.accepted_at_least(60), 30)
        await delete_queue(rabbit_settings, rabbit_settings.queue_name(CREATE_PAYMENT))
        await submitting
        sagas = await finished(app, load.request_ids)

    ledgers = upstreams.order.ledger, upstreams.payment.ledger
    for rid, saga in sagas.items():
        outcome = outcome_of(rid, *ledgers)
        if saga.state == SagaState.COMPLETED:
            assert outcome == Outcome.COMPLETED, rid
        else:
            assert saga.state == SagaState.COMPENSATED, rid
            assert outcome in (Outcome.COMPENSATED, Outcome.NOTHING), rid
    assert await queues_drained(rabbit_settings) == {}


async def delete_queue(settings: BrokerSettings, name: str) -> None:
    connection = await aio_pika.connect(settings.url.get_secret_value(), timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name, if_unused=False, if_empty=False)


async def test_a_rollback_node_failing_for_good_ends_compensation_failed_within_its_bound(
    app: BookingApp,
    booking: booking_pb2_grpc.BookingServiceAsyncStub,
    upstreams: Upstreams,
    forger: RabbitMQBroker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(key: str) -> None:
        raise RuntimeError("the order ledger is broken")

    monkeypatch.setattr(upstreams.order.ledger, "cancel_order_by_key", refuse)
    loop = asyncio.get_running_loop()
    started = loop.time()

    await book(booking, "stuck-1", faulty=True)
    [saga] = (await finished(app, ["stuck-1"])).values()
    took = loop.time() - started

    # The rollback node's policy: 5 attempts, backoff 0.1 s doubling to 2 s (about 3 s).
    assert saga.state == SagaState.COMPENSATION_FAILED
    assert took < 10
    assert saga.error_reason.startswith("rollback node failed")
    assert outcome_of("stuck-1", upstreams.order.ledger, upstreams.payment.ledger) == (
        Outcome.HALF_DONE
    )
    failed = app.orchestrator.metrics.sagas_compensation_failed.labels(ASYNC_BOOKING, "async")
    assert failed._value.get() == 1
    [reason] = (await dead_letters(app, (CANCEL_ASYNC_BOOKING,), 1)).values()
    assert reason.startswith("COMPENSATION_FAILED: rollback node failed")
