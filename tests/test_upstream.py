"""The demo upstreams, served by real grpc.aio servers on free ports."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pb import order_pb2, order_pb2_grpc, payment_pb2, payment_pb2_grpc
from upstream import RunningUpstream, serve_upstream
from upstream.ledger import Ledger, OrderRecord
from upstream.server import DEFAULT_PORTS, Service, build_arg_parser

if TYPE_CHECKING:
    from pb.order_pb2_grpc import OrderServiceAsyncStub
    from pb.payment_pb2_grpc import PaymentServiceAsyncStub

ROOT = Path(__file__).resolve().parent.parent
KEY = "x-idempotency-key"
# Two sagas of one request id, from two facades: the keys the orchestrator sends.
SYNC_ORDER, ASYNC_ORDER = "sync:r-1:order", "async:r-1:order"
SYNC_PAYMENT, ASYNC_PAYMENT = "sync:r-1:payment", "async:r-1:payment"


class Upstreams:
    """Starts servers and opens channels for one test; :meth:`close` ends them all."""

    def __init__(self) -> None:
        self._servers: list[RunningUpstream] = []
        self._channels: list[grpc.aio.Channel] = []

    async def start(self, service: Service, **options: Any) -> RunningUpstream:
        running = await serve_upstream(service, port=0, **options)
        self._servers.append(running)
        return running

    def channel(self, target: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(target)
        self._channels.append(channel)
        return channel

    async def orders(self, **options: Any) -> tuple[RunningUpstream, OrderServiceAsyncStub]:
        running = await self.start("order", **options)
        return running, order_pb2_grpc.OrderServiceStub(self.channel(running.target))

    async def payments(self, **options: Any) -> tuple[RunningUpstream, PaymentServiceAsyncStub]:
        running = await self.start("payment", **options)
        return running, payment_pb2_grpc.PaymentServiceStub(self.channel(running.target))

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)
        for running in reversed(self._servers):
            await running.stop(None)


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    started = Upstreams()
    try:
        yield started
    finally:
        await started.close()


@pytest.fixture
async def order_upstream(upstreams: Upstreams) -> tuple[RunningUpstream, OrderServiceAsyncStub]:
    return await upstreams.orders()


@pytest.fixture
def orders(order_upstream: tuple[RunningUpstream, OrderServiceAsyncStub]) -> OrderServiceAsyncStub:
    return order_upstream[1]


@pytest.fixture
def order_ledger(order_upstream: tuple[RunningUpstream, OrderServiceAsyncStub]) -> Ledger:
    return order_upstream[0].ledger


@pytest.fixture
async def payment_upstream(
    upstreams: Upstreams,
) -> tuple[RunningUpstream, PaymentServiceAsyncStub]:
    return await upstreams.payments()


@pytest.fixture
def payments(
    payment_upstream: tuple[RunningUpstream, PaymentServiceAsyncStub],
) -> PaymentServiceAsyncStub:
    return payment_upstream[1]


@pytest.fixture
def payment_ledger(payment_upstream: tuple[RunningUpstream, PaymentServiceAsyncStub]) -> Ledger:
    return payment_upstream[0].ledger


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """The error ``call`` fails with; fails the test when it succeeds."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def new_order(request_id: str = "r-1", product_id: int = 7, count: int = 2) -> Any:
    return order_pb2.CreateOrderRequest(RequestID=request_id, ProductID=product_id, Count=count)


def new_payment(request_id: str = "r-1", order_id: int = 1, amount: int = 100) -> Any:
    return payment_pb2.CreatePaymentRequest(RequestID=request_id, OrderID=order_id, Amount=amount)


def keyed(key: str) -> tuple[tuple[str, str]]:
    """The metadata of a create under idempotency key ``key``."""
    return ((KEY, key),)


def cancel_by_key(key: str, request_id: str = "r-1") -> Any:
    return order_pb2.CancelOrderRequest(RequestID=request_id, IdempotencyKey=key)


def refund_by_key(key: str, request_id: str = "r-1") -> Any:
    return payment_pb2.RefundPaymentRequest(RequestID=request_id, IdempotencyKey=key)


# Orders.


async def test_create_order_returns_created_order_with_id(orders: OrderServiceAsyncStub) -> None:
    order = await orders.CreateOrder(new_order("r-1", product_id=7, count=2))

    assert order.OrderID > 0
    assert (order.RequestID, order.ProductID, order.Count) == ("r-1", 7, 2)
    assert order.Status == order_pb2.CREATED


async def test_create_order_count_zero_means_one(orders: OrderServiceAsyncStub) -> None:
    order = await orders.CreateOrder(new_order(count=0))

    assert order.Count == 1


async def test_same_idempotency_key_returns_same_order_once(
    orders: OrderServiceAsyncStub, order_ledger: Ledger
) -> None:
    first = await orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-1"),))
    second = await orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-1"),))
    found = await orders.GetOrder(order_pb2.GetOrderRequest(RequestID="r-1"))

    assert second.OrderID == first.OrderID
    assert found.OrderID == first.OrderID
    assert order_ledger.count_orders("r-1") == 1


async def test_different_idempotency_keys_create_different_orders(
    orders: OrderServiceAsyncStub, order_ledger: Ledger
) -> None:
    first = await orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-1"),))
    second = await orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-2"),))

    assert second.OrderID != first.OrderID
    assert order_ledger.count_orders("r-1") == 2


async def test_create_without_idempotency_key_creates_a_new_order_each_call(
    orders: OrderServiceAsyncStub,
) -> None:
    first = await orders.CreateOrder(new_order("r-1"))
    second = await orders.CreateOrder(new_order("r-1"))

    assert second.OrderID != first.OrderID


@pytest.mark.parametrize(
    "request_",
    [
        new_order(product_id=0),
        new_order(product_id=-3),
        new_order(count=-1),
        new_order(request_id=""),
    ],
    ids=["zero-product", "negative-product", "negative-count", "no-request-id"],
)
async def test_invalid_create_order_is_invalid_argument_and_records_nothing(
    orders: OrderServiceAsyncStub, order_ledger: Ledger, request_: Any
) -> None:
    error = await rpc_error(orders.CreateOrder(request_))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert order_ledger.count_orders(request_.RequestID) == 0


async def test_error_message_names_the_request_id(orders: OrderServiceAsyncStub) -> None:
    error = await rpc_error(orders.CreateOrder(new_order("r-42", product_id=0)))

    assert "r-42" in (error.details() or "")


async def test_cancel_by_request_id_returns_cancelled_order(
    orders: OrderServiceAsyncStub,
) -> None:
    created = await orders.CreateOrder(new_order("r-1"))

    cancelled = await orders.CancelOrder(order_pb2.CancelOrderRequest(RequestID="r-1"))

    assert cancelled.OrderID == created.OrderID
    assert cancelled.Status == order_pb2.CANCELLED


async def test_cancel_twice_returns_the_same_cancelled_order(
    orders: OrderServiceAsyncStub,
) -> None:
    created = await orders.CreateOrder(new_order("r-1"))
    first = await orders.CancelOrder(order_pb2.CancelOrderRequest(OrderID=created.OrderID))

    second = await orders.CancelOrder(order_pb2.CancelOrderRequest(OrderID=created.OrderID))

    assert second == first


async def test_cancel_by_request_id_cancels_every_order_and_returns_the_latest(
    orders: OrderServiceAsyncStub,
) -> None:
    older = await orders.CreateOrder(new_order("r-1"))
    newer = await orders.CreateOrder(new_order("r-1"))

    cancelled = await orders.CancelOrder(order_pb2.CancelOrderRequest(RequestID="r-1"))
    older_now = await orders.GetOrder(order_pb2.GetOrderRequest(OrderID=older.OrderID))

    assert cancelled.OrderID == newer.OrderID
    assert older_now.Status == order_pb2.CANCELLED


async def test_cancel_unknown_order_is_not_found(orders: OrderServiceAsyncStub) -> None:
    error = await rpc_error(orders.CancelOrder(order_pb2.CancelOrderRequest(RequestID="nope")))

    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "request_",
    [order_pb2.GetOrderRequest(OrderID=999), order_pb2.GetOrderRequest(RequestID="nope")],
    ids=["by-order-id", "by-request-id"],
)
async def test_get_unknown_order_is_not_found(orders: OrderServiceAsyncStub, request_: Any) -> None:
    error = await rpc_error(orders.GetOrder(request_))

    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_before_create_makes_the_create_aborted_and_creates_nothing(
    orders: OrderServiceAsyncStub, order_ledger: Ledger
) -> None:
    cancel_error = await rpc_error(
        orders.CancelOrder(order_pb2.CancelOrderRequest(RequestID="r-1"))
    )

    error = await rpc_error(orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-1"),)))

    assert cancel_error.code() == grpc.StatusCode.NOT_FOUND
    assert error.code() == grpc.StatusCode.ABORTED
    assert "request 'r-1' was already compensated" in (error.details() or "")
    assert order_ledger.count_orders("r-1") == 0


async def test_create_with_a_new_key_after_cancel_is_aborted(
    orders: OrderServiceAsyncStub, order_ledger: Ledger
) -> None:
    await orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-1"),))
    await orders.CancelOrder(order_pb2.CancelOrderRequest(RequestID="r-1"))

    error = await rpc_error(orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-2"),)))

    assert error.code() == grpc.StatusCode.ABORTED
    assert order_ledger.count_orders("r-1") == 1


async def test_replay_with_the_original_key_after_cancel_returns_the_cancelled_order(
    orders: OrderServiceAsyncStub, order_ledger: Ledger
) -> None:
    created = await orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-1"),))
    await orders.CancelOrder(order_pb2.CancelOrderRequest(RequestID="r-1"))

    replayed = await orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-1"),))

    assert replayed.OrderID == created.OrderID
    assert replayed.Status == order_pb2.CANCELLED
    assert order_ledger.count_orders("r-1") == 1


async def test_cancel_of_an_unknown_order_id_does_not_block_its_request_id(
    orders: OrderServiceAsyncStub,
) -> None:
    error = await rpc_error(
        orders.CancelOrder(order_pb2.CancelOrderRequest(OrderID=999, RequestID="r-1"))
    )

    created = await orders.CreateOrder(new_order("r-1"))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert created.Status == order_pb2.CREATED


async def test_get_and_cancel_without_ids_are_invalid_argument(
    orders: OrderServiceAsyncStub,
) -> None:
    get_error = await rpc_error(orders.GetOrder(order_pb2.GetOrderRequest()))
    cancel_error = await rpc_error(orders.CancelOrder(order_pb2.CancelOrderRequest()))

    assert get_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cancel_error.code() == grpc.StatusCode.INVALID_ARGUMENT


# Orders undone by idempotency key.


async def test_cancel_by_key_cancels_only_the_order_that_key_made(
    orders: OrderServiceAsyncStub,
) -> None:
    sync_order = await orders.CreateOrder(new_order("r-1"), metadata=keyed(SYNC_ORDER))
    async_order = await orders.CreateOrder(new_order("r-1"), metadata=keyed(ASYNC_ORDER))

    cancelled = await orders.CancelOrder(cancel_by_key(SYNC_ORDER))
    other = await orders.GetOrder(order_pb2.GetOrderRequest(OrderID=async_order.OrderID))

    assert cancelled.OrderID == sync_order.OrderID
    assert cancelled.Status == order_pb2.CANCELLED
    assert other.Status == order_pb2.CREATED


async def test_cancel_by_key_leaves_the_request_id_open_to_another_keys_create(
    orders: OrderServiceAsyncStub,
) -> None:
    await orders.CreateOrder(new_order("r-1"), metadata=keyed(SYNC_ORDER))
    await orders.CancelOrder(cancel_by_key(SYNC_ORDER))

    created = await orders.CreateOrder(new_order("r-1"), metadata=keyed(ASYNC_ORDER))

    assert created.Status == order_pb2.CREATED


async def test_cancel_by_key_takes_precedence_over_order_id_and_request_id(
    orders: OrderServiceAsyncStub,
) -> None:
    sync_order = await orders.CreateOrder(new_order("r-1"), metadata=keyed(SYNC_ORDER))
    async_order = await orders.CreateOrder(new_order("r-1"), metadata=keyed(ASYNC_ORDER))
    request = order_pb2.CancelOrderRequest(
        OrderID=async_order.OrderID, RequestID="r-1", IdempotencyKey=SYNC_ORDER
    )

    cancelled = await orders.CancelOrder(request)
    other = await orders.GetOrder(order_pb2.GetOrderRequest(OrderID=async_order.OrderID))

    assert cancelled.OrderID == sync_order.OrderID
    assert other.Status == order_pb2.CREATED


async def test_create_arriving_after_its_cancel_by_key_is_aborted_and_creates_nothing(
    orders: OrderServiceAsyncStub, order_ledger: Ledger
) -> None:
    assert await orders.CancelOrder(cancel_by_key(SYNC_ORDER)) == order_pb2.Order()

    error = await rpc_error(orders.CreateOrder(new_order("r-1"), metadata=keyed(SYNC_ORDER)))

    assert error.code() == grpc.StatusCode.ABORTED
    assert repr(SYNC_ORDER) in (error.details() or "")
    assert order_ledger.count_orders("r-1") == 0


async def test_cancel_by_key_of_a_create_that_never_arrived_undoes_nothing_and_refuses_it(
    orders: OrderServiceAsyncStub,
) -> None:
    cancelled = await orders.CancelOrder(cancel_by_key(SYNC_ORDER))

    error = await rpc_error(orders.CreateOrder(new_order("r-1"), metadata=keyed(SYNC_ORDER)))

    assert cancelled == order_pb2.Order()
    assert error.code() == grpc.StatusCode.ABORTED


async def test_create_replayed_after_its_cancel_by_key_returns_the_cancelled_order(
    orders: OrderServiceAsyncStub, order_ledger: Ledger
) -> None:
    created = await orders.CreateOrder(new_order("r-1"), metadata=keyed(SYNC_ORDER))
    await orders.CancelOrder(cancel_by_key(SYNC_ORDER))

    replayed = await orders.CreateOrder(new_order("r-1"), metadata=keyed(SYNC_ORDER))

    assert replayed.OrderID == created.OrderID
    assert replayed.Status == order_pb2.CANCELLED
    assert order_ledger.count_orders("r-1") == 1


async def test_cancel_by_key_twice_returns_the_same_cancelled_order(
    orders: OrderServiceAsyncStub,
) -> None:
    await orders.CreateOrder(new_order("r-1"), metadata=keyed(SYNC_ORDER))
    first = await orders.CancelOrder(cancel_by_key(SYNC_ORDER))

    second = await orders.CancelOrder(cancel_by_key(SYNC_ORDER))

    assert second == first
    assert second.Status == order_pb2.CANCELLED


async def test_cancel_by_key_of_a_lost_create_cancels_the_order_it_made(
    upstreams: Upstreams,
) -> None:
    running, orders = await upstreams.orders(fail_after_apply_rate=1.0)
    await rpc_error(orders.CreateOrder(new_order("r-1"), metadata=keyed(SYNC_ORDER)))

    cancelled = await orders.CancelOrder(cancel_by_key(SYNC_ORDER))

    assert cancelled.Status == order_pb2.CANCELLED
    assert running.ledger.count_orders("r-1") == 1


# Payments.


async def test_create_payment_returns_paid_payment(payments: PaymentServiceAsyncStub) -> None:
    payment = await payments.CreatePayment(new_payment("r-1", order_id=3, amount=250))

    assert payment.PaymentID > 0
    assert (payment.RequestID, payment.OrderID, payment.Amount) == ("r-1", 3, 250)
    assert payment.Status == payment_pb2.PAID


async def test_same_idempotency_key_returns_same_payment(
    payments: PaymentServiceAsyncStub,
) -> None:
    first = await payments.CreatePayment(new_payment("r-1"), metadata=((KEY, "k-1"),))
    second = await payments.CreatePayment(new_payment("r-1"), metadata=((KEY, "k-1"),))

    assert second.PaymentID == first.PaymentID


async def test_fault_inject_declines_payment_and_records_nothing(
    payments: PaymentServiceAsyncStub,
) -> None:
    request = payment_pb2.CreatePaymentRequest(RequestID="r-1", OrderID=1, FaultInject=True)

    error = await rpc_error(payments.CreatePayment(request))
    lookup = await rpc_error(payments.GetPayment(payment_pb2.GetPaymentRequest(RequestID="r-1")))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "payment declined (fault injected)" in (error.details() or "")
    assert lookup.code() == grpc.StatusCode.NOT_FOUND


async def test_refund_returns_refunded_payment_and_is_idempotent(
    payments: PaymentServiceAsyncStub,
) -> None:
    paid = await payments.CreatePayment(new_payment("r-1"))

    first = await payments.RefundPayment(payment_pb2.RefundPaymentRequest(RequestID="r-1"))
    second = await payments.RefundPayment(
        payment_pb2.RefundPaymentRequest(PaymentID=paid.PaymentID)
    )

    assert first.PaymentID == paid.PaymentID
    assert first.Status == payment_pb2.REFUNDED
    assert second == first


async def test_invalid_create_payment_is_invalid_argument(
    payments: PaymentServiceAsyncStub,
) -> None:
    error = await rpc_error(payments.CreatePayment(new_payment("r-1", order_id=0)))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_refund_before_pay_makes_the_payment_aborted_and_records_nothing(
    payments: PaymentServiceAsyncStub, payment_ledger: Ledger
) -> None:
    refund_error = await rpc_error(
        payments.RefundPayment(payment_pb2.RefundPaymentRequest(RequestID="r-1"))
    )

    error = await rpc_error(payments.CreatePayment(new_payment("r-1"), metadata=((KEY, "k-1"),)))

    assert refund_error.code() == grpc.StatusCode.NOT_FOUND
    assert error.code() == grpc.StatusCode.ABORTED
    assert "request 'r-1' was already compensated" in (error.details() or "")
    assert payment_ledger.count_payments("r-1") == 0


async def test_payment_replay_with_the_original_key_after_refund_returns_the_refund(
    payments: PaymentServiceAsyncStub, payment_ledger: Ledger
) -> None:
    paid = await payments.CreatePayment(new_payment("r-1"), metadata=((KEY, "k-1"),))
    await payments.RefundPayment(payment_pb2.RefundPaymentRequest(RequestID="r-1"))

    replayed = await payments.CreatePayment(new_payment("r-1"), metadata=((KEY, "k-1"),))

    assert replayed.PaymentID == paid.PaymentID
    assert replayed.Status == payment_pb2.REFUNDED
    assert payment_ledger.count_payments("r-1") == 1


async def test_refund_unknown_payment_is_not_found(payments: PaymentServiceAsyncStub) -> None:
    error = await rpc_error(payments.RefundPayment(payment_pb2.RefundPaymentRequest(PaymentID=9)))

    assert error.code() == grpc.StatusCode.NOT_FOUND


# Payments undone by idempotency key.


async def test_refund_by_key_refunds_only_the_payment_that_key_made(
    payments: PaymentServiceAsyncStub,
) -> None:
    sync_payment = await payments.CreatePayment(new_payment("r-1"), metadata=keyed(SYNC_PAYMENT))
    async_payment = await payments.CreatePayment(new_payment("r-1"), metadata=keyed(ASYNC_PAYMENT))

    refunded = await payments.RefundPayment(refund_by_key(SYNC_PAYMENT))
    other = await payments.GetPayment(
        payment_pb2.GetPaymentRequest(PaymentID=async_payment.PaymentID)
    )

    assert refunded.PaymentID == sync_payment.PaymentID
    assert refunded.Status == payment_pb2.REFUNDED
    assert other.Status == payment_pb2.PAID


async def test_payment_arriving_after_its_refund_by_key_is_aborted_and_records_nothing(
    payments: PaymentServiceAsyncStub, payment_ledger: Ledger
) -> None:
    assert await payments.RefundPayment(refund_by_key(SYNC_PAYMENT)) == payment_pb2.Payment()

    error = await rpc_error(
        payments.CreatePayment(new_payment("r-1"), metadata=keyed(SYNC_PAYMENT))
    )

    assert error.code() == grpc.StatusCode.ABORTED
    assert payment_ledger.count_payments("r-1") == 0


async def test_refund_by_key_of_a_payment_that_never_arrived_undoes_nothing_and_refuses_it(
    payments: PaymentServiceAsyncStub,
) -> None:
    refunded = await payments.RefundPayment(refund_by_key(SYNC_PAYMENT))

    error = await rpc_error(
        payments.CreatePayment(new_payment("r-1"), metadata=keyed(SYNC_PAYMENT))
    )

    assert refunded == payment_pb2.Payment()
    assert error.code() == grpc.StatusCode.ABORTED


async def test_refund_by_key_twice_returns_the_same_refunded_payment(
    payments: PaymentServiceAsyncStub,
) -> None:
    await payments.CreatePayment(new_payment("r-1"), metadata=keyed(SYNC_PAYMENT))
    first = await payments.RefundPayment(refund_by_key(SYNC_PAYMENT))

    second = await payments.RefundPayment(refund_by_key(SYNC_PAYMENT))

    assert second == first
    assert second.Status == payment_pb2.REFUNDED


# Persistence, injected faults and serving.


async def test_file_ledger_keeps_orders_across_restart(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    db = str(tmp_path / "orders.db")
    first_run, orders = await upstreams.orders(db_path=db)
    created = await orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-1"),))
    await first_run.stop()

    _, orders = await upstreams.orders(db_path=db)
    found = await orders.GetOrder(order_pb2.GetOrderRequest(OrderID=created.OrderID))
    replayed = await orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-1"),))

    assert found == created
    assert replayed.OrderID == created.OrderID


async def test_file_ledger_keeps_tombstones_across_restart(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    db = str(tmp_path / "orders.db")
    first_run, orders = await upstreams.orders(db_path=db)
    await rpc_error(orders.CancelOrder(order_pb2.CancelOrderRequest(RequestID="r-1")))
    await first_run.stop()

    second_run, orders = await upstreams.orders(db_path=db)
    error = await rpc_error(orders.CreateOrder(new_order("r-1")))

    assert error.code() == grpc.StatusCode.ABORTED
    assert second_run.ledger.count_orders("r-1") == 0


# The tables of a ledger file made before the key tombstones were added.
TABLES_BEFORE_KEY_TOMBSTONES = {
    "orders",
    "order_idempotency",
    "order_tombstones",
    "payments",
    "payment_idempotency",
    "payment_tombstones",
    "sqlite_sequence",
}


def tables_of(db: Path) -> set[str]:
    with closing(sqlite3.connect(db)) as raw:
        rows = raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


def ledger_file_before_key_tombstones(db: Path) -> OrderRecord:
    """Write at ``db`` a ledger without the key tombstone tables, holding one order made by k-1."""
    ledger = Ledger(str(db))
    try:
        made = ledger.create_order("r-1", 7, 2, idempotency_key="k-1")
    finally:
        ledger.close()
    with closing(sqlite3.connect(db, isolation_level=None)) as raw:
        raw.execute("DROP TABLE order_key_tombstones")
        raw.execute("DROP TABLE payment_key_tombstones")
    assert tables_of(db) == TABLES_BEFORE_KEY_TOMBSTONES
    return made


async def test_ledger_file_from_before_key_tombstones_opens_and_keeps_its_orders(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    db = tmp_path / "orders.db"
    made = ledger_file_before_key_tombstones(db)

    running, orders = await upstreams.orders(db_path=str(db))
    replayed = await orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-1"),))
    another = await orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-2"),))

    assert replayed.OrderID == made.id
    assert another.OrderID != made.id
    assert running.ledger.count_orders("r-1") == 2
    assert tables_of(db) > TABLES_BEFORE_KEY_TOMBSTONES


async def test_cancel_by_key_works_on_a_ledger_file_from_before_key_tombstones(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    db = tmp_path / "orders.db"
    made = ledger_file_before_key_tombstones(db)
    _, orders = await upstreams.orders(db_path=str(db))

    cancelled = await orders.CancelOrder(cancel_by_key("k-1"))
    assert await orders.CancelOrder(cancel_by_key("k-2")) == order_pb2.Order()
    error = await rpc_error(orders.CreateOrder(new_order("r-1"), metadata=keyed("k-2")))

    assert cancelled.OrderID == made.id
    assert cancelled.Status == order_pb2.CANCELLED
    assert error.code() == grpc.StatusCode.ABORTED


async def test_file_ledger_keeps_key_tombstones_across_restart(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    db = str(tmp_path / "orders.db")
    first_run, orders = await upstreams.orders(db_path=db)
    assert await orders.CancelOrder(cancel_by_key(SYNC_ORDER)) == order_pb2.Order()
    await first_run.stop()

    second_run, orders = await upstreams.orders(db_path=db)
    error = await rpc_error(orders.CreateOrder(new_order("r-1"), metadata=keyed(SYNC_ORDER)))

    assert error.code() == grpc.StatusCode.ABORTED
    assert second_run.ledger.count_orders("r-1") == 0


async def test_fail_rate_one_is_unavailable_and_records_nothing(upstreams: Upstreams) -> None:
    running, orders = await upstreams.orders(fail_rate=1.0)

    error = await rpc_error(orders.CreateOrder(new_order("r-1")))

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "transient failure (injected)" in (error.details() or "")
    assert running.ledger.count_orders("r-1") == 0


async def test_fail_after_apply_rate_one_is_unavailable_but_the_order_exists(
    upstreams: Upstreams,
) -> None:
    running, orders = await upstreams.orders(fail_after_apply_rate=1.0)

    error = await rpc_error(orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-1"),)))

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "transient failure after apply (injected)" in (error.details() or "")
    assert running.ledger.count_orders("r-1") == 1


async def test_fail_after_apply_rate_one_is_unavailable_but_the_payment_exists(
    upstreams: Upstreams,
) -> None:
    running, payments = await upstreams.payments(fail_after_apply_rate=1.0)

    error = await rpc_error(payments.CreatePayment(new_payment("r-1"), metadata=((KEY, "k-1"),)))

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert running.ledger.count_payments("r-1") == 1


async def test_retry_after_a_lost_response_returns_the_first_order_without_a_second_row(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    # The retry reaches a healthy replica over the same database, since the
    # faulty server would lose every response, the retry's included.
    db = str(tmp_path / "orders.db")
    faulty, faulty_orders = await upstreams.orders(db_path=db, fail_after_apply_rate=1.0)
    _, healthy_orders = await upstreams.orders(db_path=db)
    await rpc_error(faulty_orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-1"),)))
    first = faulty.ledger.latest_order_of("r-1")

    retried = await healthy_orders.CreateOrder(new_order("r-1"), metadata=((KEY, "k-1"),))

    assert first is not None
    assert retried.OrderID == first.id
    assert faulty.ledger.count_orders("r-1") == 1


async def test_latency_ms_delays_each_call(upstreams: Upstreams) -> None:
    _, orders = await upstreams.orders(latency_ms=100)

    started = time.monotonic()
    await orders.CreateOrder(new_order())

    assert time.monotonic() - started >= 0.1


async def test_fault_options_out_of_range_are_rejected() -> None:
    with pytest.raises(ValueError, match="fail_rate"):
        await serve_upstream("order", port=0, fail_rate=1.5)
    with pytest.raises(ValueError, match="latency_ms"):
        await serve_upstream("payment", port=0, latency_ms=-1)
    with pytest.raises(ValueError, match="fail_after_apply_rate"):
        await serve_upstream("order", port=0, fail_after_apply_rate=-0.1)


@pytest.mark.parametrize("service", ["", "pb.OrderService"])
async def test_health_check_reports_serving(
    upstreams: Upstreams,
    order_upstream: tuple[RunningUpstream, OrderServiceAsyncStub],
    service: str,
) -> None:
    health = health_pb2_grpc.HealthStub(upstreams.channel(order_upstream[0].target))

    response = await health.Check(health_pb2.HealthCheckRequest(service=service))

    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(
    upstreams: Upstreams, payment_upstream: tuple[RunningUpstream, PaymentServiceAsyncStub]
) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(
        upstreams.channel(payment_upstream[0].target)
    )
    call = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )

    response = await call.read()
    names = {service.name for service in response.list_services_response.service}

    assert "pb.PaymentService" in names
    assert "grpc.health.v1.Health" in names


async def test_port_in_use_is_refused(
    upstreams: Upstreams, order_upstream: tuple[RunningUpstream, OrderServiceAsyncStub]
) -> None:
    with pytest.raises(RuntimeError):
        await serve_upstream("order", port=order_upstream[0].port)


# The command line.


def test_arg_parser_defaults() -> None:
    args = build_arg_parser().parse_args(["payment"])

    assert (args.service, args.port, args.db) == ("payment", None, ":memory:")
    assert (args.latency_ms, args.fail_rate, args.fail_after_apply_rate) == (0.0, 0.0, 0.0)
    assert DEFAULT_PORTS == {"order": 50051, "payment": 50052}


def test_arg_parser_rejects_fail_rate_above_one() -> None:
    with pytest.raises(SystemExit):
        build_arg_parser().parse_args(["order", "--fail-rate", "2"])


def test_arg_parser_reads_fail_after_apply_rate() -> None:
    args = build_arg_parser().parse_args(["order", "--fail-after-apply-rate", "0.25"])

    assert args.fail_after_apply_rate == 0.25


def test_arg_parser_rejects_fail_after_apply_rate_above_one() -> None:
    with pytest.raises(SystemExit):
        build_arg_parser().parse_args(["order", "--fail-after-apply-rate", "1.5"])


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM cannot be delivered on Windows")
async def test_command_line_serves_until_sigterm_then_exits_zero(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    script = "import sys; from upstream.server import main; sys.exit(main(sys.argv[1:]))"
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", script, "order", "--port", "0", "--db", str(tmp_path / "o.db")),
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        line = await asyncio.wait_for(process.stderr.readline(), timeout=30)
        match = re.search(rb"serving on (\S+)", line)
        assert match, line
        health = health_pb2_grpc.HealthStub(upstreams.channel(match.group(1).decode()))
        response = await health.Check(health_pb2.HealthCheckRequest(service="pb.OrderService"))
        assert response.status == health_pb2.HealthCheckResponse.SERVING

        process.send_signal(signal.SIGTERM)

        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
