"""One request id, many calls: the booking service over gRPC with a real SQL saga store.

The spec: 50 concurrent and 50 later calls with one request id get one saga, one
order, one payment and 100 identical answers; the same id with another payload
is ALREADY_EXISTS. The booking service, the demo upstreams and the status
service (`orchestrator.v1.SagaService`) run on free ports; the store is a SQLite
file or a PostgreSQL database (`store_url` of tests/support/databases.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from main import BookingApp
from main import running_app as run_booking_app
from orchestrator.broker import InMemoryBroker
from orchestrator.config import StoreSettings
from orchestrator.proto import saga_pb2, saga_pb2_grpc
from pb import booking_pb2, booking_pb2_grpc, order_pb2_grpc, payment_pb2_grpc
from tests.support.app_fixtures import Upstreams, app_settings, eventually
from upstream.ledger import CANCELLED, CREATED, PAID
from upstream.server import serve_upstream

if TYPE_CHECKING:
    BookingStub = booking_pb2_grpc.BookingServiceAsyncStub
    SagaStub = saga_pb2_grpc.SagaServiceAsyncStub

pytestmark = pytest.mark.timeout(60)

CONCURRENT = 50
LATER = 50
UPSTREAM_LATENCY_MS = 50
"""Each upstream call's delay: a saga outlasts the arrival of all its concurrent duplicates."""

Outcome = tuple[str, bytes | str]
"""What a caller sees: ("OK", the serialized response) or (status code name, details)."""


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    """The demo Order and Payment services on free ports, every call slowed down.

    It stands in for the plugin's `upstreams` in this module.
    """
    async with contextlib.AsyncExitStack() as stack:
        order = await serve_upstream("order", port=0, latency_ms=UPSTREAM_LATENCY_MS)
        stack.push_async_callback(order.stop, None)
        payment = await serve_upstream("payment", port=0, latency_ms=UPSTREAM_LATENCY_MS)
        stack.push_async_callback(payment.stop, None)
        order_channel = grpc.aio.insecure_channel(order.target)
        stack.push_async_callback(order_channel.close, None)
        payment_channel = grpc.aio.insecure_channel(payment.target)
        stack.push_async_callback(payment_channel.close, None)
        yield Upstreams(
            order,
            payment,
            order_pb2_grpc.OrderServiceStub(order_channel),
            payment_pb2_grpc.PaymentServiceStub(payment_channel),
        )


def counting(calls: Counter[str], name: str, write: Callable[..., Any]) -> Callable[..., Any]:
    """`write`, counting its calls in `calls[name]`."""

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return write(*args, **kwargs)

    return counted


@pytest.fixture
def ledger_calls(upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many times each ledger write was asked for, by method name.

    Row counts alone cannot tell one saga from fifty: the upstreams dedupe a
    create on its idempotency key (facade, request id and step), so only the
    calls show whether the saga ran more than once. The rollback undoes each
    create by that key.
    """
    calls: Counter[str] = Counter()
    writes = {
        upstreams.order.ledger: ("create_order", "cancel_order_by_key"),
        upstreams.payment.ledger: ("create_payment", "refund_payment_by_key"),
    }
    for ledger, names in writes.items():
        for name in names:
            monkeypatch.setattr(ledger, name, counting(calls, name, getattr(ledger, name)))
    return calls


@pytest.fixture
async def booking_app(upstreams: Upstreams, store_url: str) -> AsyncIterator[BookingApp]:
    """The booking service with an in-memory broker and a SQL saga store on `store_url`."""
    settings = app_settings(upstreams).model_copy(update={"store": StoreSettings(url=store_url)})
    async with run_booking_app(settings) as app:
        yield app


@dataclass
class Service:
    """The running booking service as the tests reach it."""

    booking: BookingStub
    sagas: SagaStub
    """Its status service, over the saga store."""
    broker: InMemoryBroker


@pytest.fixture
async def service(booking_app: BookingApp) -> AsyncIterator[Service]:
    broker = booking_app.orchestrator.broker
    assert isinstance(broker, InMemoryBroker)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{booking_app.server.port}") as channel:
        yield Service(
            booking_pb2_grpc.BookingServiceStub(channel),
            saga_pb2_grpc.SagaServiceStub(channel),
            broker,
        )


@pytest.fixture
def rid() -> str:
    return f"idem-{uuid.uuid4()}"


def request(*, product: int = 7, fault: bool = False) -> booking_pb2.BookingRequest:
    return booking_pb2.BookingRequest(ProductID=product, Count=2, FaultInject=fault)


async def call(rpc: Callable[..., Awaitable[Any]], rid: str, message: Any) -> Outcome:
    """Call `rpc` under request id `rid` and return what the caller sees."""
    try:
        response = await rpc(message, metadata=(("x-request-id", rid),), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", response.SerializeToString(deterministic=True)


async def concurrently(make: Callable[[], Awaitable[Outcome]]) -> list[Outcome]:
    return list(await asyncio.gather(*(make() for _ in range(CONCURRENT))))


async def one_by_one(make: Callable[[], Awaitable[Outcome]]) -> list[Outcome]:
    return [await make() for _ in range(LATER)]


async def saga_of(sagas: SagaStub, rid: str) -> saga_pb2.Saga:
    return await sagas.GetSaga(saga_pb2.GetSagaRequest(request_id=rid), timeout=5)


async def saga_in(sagas: SagaStub, rid: str, state: saga_pb2.SagaState.ValueType) -> saga_pb2.Saga:
    """The saga once it reaches `state` (rollbacks and async hops end after the answers)."""

    async def reached() -> bool:
        try:
            return (await saga_of(sagas, rid)).state == state
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # not begun yet
                raise
            return False

    await eventually(reached, within=10)
    return await saga_of(sagas, rid)


async def stored_request_ids(sagas: SagaStub) -> list[str]:
    """The request id of every saga in the store (each test starts with an empty one)."""
    page = await sagas.ListSagas(saga_pb2.ListSagasRequest(page_size=500), timeout=5)
    assert not page.next_page_token
    return [saga.request_id for saga in page.sagas]


def step_log(saga: saga_pb2.Saga) -> list[tuple[str, int, int]]:
    return [(step.name, step.state, step.attempts) for step in saga.steps]


async def settled(broker: InMemoryBroker) -> None:
    """Wait until the broker has handled every message, so no late duplicate can follow."""
    async with asyncio.timeout(10):
        await broker.join()


def ledger_rows(upstreams: Upstreams, rid: str) -> tuple[int, int]:
    return upstreams.order.ledger.count_orders(rid), upstreams.payment.ledger.count_payments(rid)


async def test_100_sync_calls_with_one_request_id_run_one_saga_and_get_identical_answers(
    service: Service, upstreams: Upstreams, ledger_calls: Counter[str], rid: str
) -> None:
    def book() -> Awaitable[Outcome]:
        return call(service.booking.HandleSyncBooking, rid, request())

    outcomes = await concurrently(book) + await one_by_one(book)

    order = upstreams.order.ledger.latest_order_of(rid)
    payment = upstreams.payment.ledger.latest_payment_of(rid)
    assert order is not None and order.status == CREATED
    assert payment is not None and payment.status == PAID and payment.order_id == order.id
    answer = booking_pb2.BookingSyncResponse(RequestID=rid, OrderID=order.id, PaymentID=payment.id)
    assert len(outcomes) == 100
    assert set(outcomes) == {("OK", answer.SerializeToString(deterministic=True))}
    assert ledger_rows(upstreams, rid) == (1, 1)
    assert ledger_calls == Counter(create_order=1, create_payment=1)
    assert await stored_request_ids(service.sagas) == [rid]
    saga = await saga_of(service.sagas, rid)
    assert (saga.facade, saga.kind, saga.state) == ("SyncBooking", "sync", saga_pb2.COMPLETED)
    assert step_log(saga) == [
        ("create_order", saga_pb2.STEP_DONE, 1),
        ("create_payment", saga_pb2.STEP_DONE, 1),
    ]


async def test_the_same_request_id_with_another_payload_is_already_exists_and_books_nothing(
    service: Service, upstreams: Upstreams, ledger_calls: Counter[str], rid: str
) -> None:
    first = await call(service.booking.HandleSyncBooking, rid, request(product=7))
    assert first[0] == "OK"

    code, details = await call(service.booking.HandleSyncBooking, rid, request(product=8))

    assert code == "ALREADY_EXISTS"
    assert rid in str(details)
    assert ledger_rows(upstreams, rid) == (1, 1)
    assert ledger_calls == Counter(create_order=1, create_payment=1)
    assert (await saga_of(service.sagas, rid)).state == saga_pb2.COMPLETED
    # The refused request leaves the saga as it was: the first request still replays.
    assert await call(service.booking.HandleSyncBooking, rid, request(product=7)) == first


async def test_another_payload_while_the_first_call_runs_is_already_exists_and_spares_it(
    service: Service, upstreams: Upstreams, ledger_calls: Counter[str], rid: str
) -> None:
    first = asyncio.create_task(call(service.booking.HandleSyncBooking, rid, request(product=7)))
    try:
        await saga_in(service.sagas, rid, saga_pb2.RUNNING)
        code, details = await call(service.booking.HandleSyncBooking, rid, request(product=8))
    finally:
        outcome = await first

    assert code == "ALREADY_EXISTS"
    assert rid in str(details)
    assert outcome[0] == "OK"
    assert ledger_rows(upstreams, rid) == (1, 1)
    assert ledger_calls == Counter(create_order=1, create_payment=1)
    assert (await saga_of(service.sagas, rid)).state == saga_pb2.COMPLETED


async def test_100_failing_sync_calls_with_one_request_id_get_one_error_and_undo_once(
    service: Service, upstreams: Upstreams, ledger_calls: Counter[str], rid: str
) -> None:
    def book() -> Awaitable[Outcome]:
        return call(service.booking.HandleSyncBooking, rid, request(fault=True))

    outcomes = await concurrently(book) + await one_by_one(book)

    assert len(outcomes) == 100
    assert len(set(outcomes)) == 1
    code, details = outcomes[0]
    assert code == "FAILED_PRECONDITION"
    assert rid in str(details) and "create_payment" in str(details)
    saga = await saga_in(service.sagas, rid, saga_pb2.COMPENSATED)
    await settled(service.broker)
    order = upstreams.order.ledger.latest_order_of(rid)
    assert order is not None and order.status == CANCELLED
    assert ledger_rows(upstreams, rid) == (1, 0)
    # The payment is declined before it reaches the ledger; its refund finds nothing.
    assert ledger_calls == Counter(create_order=1, cancel_order_by_key=1, refund_payment_by_key=1)
    assert await stored_request_ids(service.sagas) == [rid]
    assert (saga.error_code, saga.kind) == ("FAILED_PRECONDITION", "sync")
    assert step_log(saga) == [
        ("create_order", saga_pb2.STEP_DONE, 1),
        ("create_payment", saga_pb2.STEP_FAILED, 1),
    ]


async def test_100_async_calls_with_one_request_id_are_all_accepted_and_run_one_saga(
    service: Service, upstreams: Upstreams, ledger_calls: Counter[str], rid: str
) -> None:
    def book() -> Awaitable[Outcome]:
        return call(service.booking.HandleAsyncBooking, rid, request())

    during = await concurrently(book)
    # An accepted call returns before its saga ends: the later calls wait for the end.
    await saga_in(service.sagas, rid, saga_pb2.COMPLETED)
    after = await one_by_one(book)
    await settled(service.broker)

    accepted = booking_pb2.BookingASyncResponse(RequestID=rid)
    assert set(during + after) == {("OK", accepted.SerializeToString(deterministic=True))}
    assert ledger_rows(upstreams, rid) == (1, 1)
    assert ledger_calls == Counter(create_order=1, create_payment=1)
    assert await stored_request_ids(service.sagas) == [rid]
    saga = await saga_of(service.sagas, rid)
    assert (saga.facade, saga.kind, saga.state) == ("AsyncBooking", "async", saga_pb2.COMPLETED)
    assert step_log(saga) == [
        ("create_order", saga_pb2.STEP_DONE, 1),
        ("create_payment", saga_pb2.STEP_DONE, 1),
    ]
