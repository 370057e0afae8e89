"""The baseline of bench/async_booking.py: HandleAsyncBooking by hand on aio-pika, no framework.

A bare grpc.aio servicer on uvloop (the framework's server options, a health
service) whose HandleAsyncBooking publishes a JSON message to the first queue
and answers with the request id once RabbitMQ confirmed it. Two consumers make
the saga: queue 1 calls OrderService.CreateOrder, publishes to queue 2 and then
acks; queue 2 calls PaymentService.CreatePayment and acks. Upstream calls carry
the framework's metadata (``x-request-id``, ``x-idempotency-key``) and timeout.

The topology is the framework's (orchestrator/broker/rabbitmq.py): durable
direct exchanges, quorum queues with a delivery limit, at-least-once
dead-lettering and ``x-overflow: reject-publish``, each with a quorum ``.dlq``.
Messages are persistent, published ``mandatory`` on one channel with publisher
confirms; every consumer has its own channel, prefetch = the topic's
concurrency, manual acks. aiormq runs each delivery in a task of its own, so
the publishes of independent deliveries are pipelined, never serialised.
Connection, channels and stubs are made once at startup.

With ``--journal FILE`` it keeps a saga journal by hand (bench/_journal.py):
HandleAsyncBooking records the saga before publishing its first message (a
request id already journaled publishes nothing); each consumer reads the saga's
step first and acks a message for a saga not at its step without calling
anything; a step's end is committed before the next message is published (or,
after the last, before the ack).

    python bench/baseline_async.py --port 10001 --order 127.0.0.1:50051 \\
        --payment 127.0.0.1:50052 --amqp-url amqp://guest:guest@127.0.0.1:5672/ --prefix b.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import aio_pika
import grpc
import uvloop
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

from bench._journal import Journal, add_journal_option  # noqa: E402
from bench.common import add_processes_options, as_processes  # noqa: E402
from pb import (  # noqa: E402
    booking_pb2,
    booking_pb2_grpc,
    order_pb2,
    order_pb2_grpc,
    payment_pb2,
    payment_pb2_grpc,
)

UNIT_PRICE: Final = 100  # node.booking.UNIT_PRICE, not imported: the baseline uses no app code
ORDER_QUEUE: Final = "create_order"
PAYMENT_QUEUE: Final = "create_payment"
ServicerContext = grpc.aio.ServicerContext[Any, Any]
Paid = Callable[[str, int, int], None]
"""`paid(request_id, order_id, payment_id)`: told of each saga whose payment was taken."""

log = logging.getLogger("baseline_async")


def topology(
    prefix: str, names: tuple[str, str] = (ORDER_QUEUE, PAYMENT_QUEUE)
) -> tuple[list[str], list[str]]:
    """The queues (of the two hops `names`) and exchanges the baseline declares under `prefix`,
    to delete them after."""
    queues = [f"{prefix}{name}{suffix}" for name in names for suffix in ("", ".dlq")]
    return queues, [f"{prefix}exchange", f"{prefix}exchange.dlx"]


def request_id_of(context: ServicerContext) -> str:
    """The caller's `x-request-id`, or a new UUID4."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return value.decode() if isinstance(value, bytes) else value
    return str(uuid.uuid4())


def metadata(request_id: str, step: str) -> tuple[tuple[str, str], ...]:
    """The framework's upstream metadata (orchestrator.idempotency_metadata)."""
    return (("x-request-id", request_id), ("x-idempotency-key", f"{request_id}:{step}"))


async def publish(
    exchange: AbstractExchange, queue: str, body: dict[str, Any], message_id: str
) -> None:
    """Publish `body` as JSON to `queue` through `exchange`, persistently and mandatory;
    returns once RabbitMQ confirmed it (the exchange's channel has publisher confirms)."""
    message = aio_pika.Message(
        json.dumps(body).encode(),
        message_id=message_id,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    await exchange.publish(message, routing_key=queue, mandatory=True)


class Saga:
    """The two hops of the saga and the publishing they share."""

    def __init__(
        self,
        exchange: AbstractExchange,
        prefix: str,
        order: order_pb2_grpc.OrderServiceAsyncStub,
        payment: payment_pb2_grpc.PaymentServiceAsyncStub,
        timeout_seconds: float,
        *,
        names: tuple[str, str] = (ORDER_QUEUE, PAYMENT_QUEUE),
        paid: Paid | None = None,
        journal: Journal | None = None,
    ) -> None:
        self._exchange = exchange
        self._journal = journal
        self._names = names
        self._order_queue = f"{prefix}{names[0]}"
        self._payment_queue = f"{prefix}{names[1]}"
        self._order = order
        self._payment = payment
        self._timeout = timeout_seconds
        self._paid = paid

    async def publish(self, queue: str, body: dict[str, Any], message_id: str) -> None:
        """Publish persistently and mandatory; returns once RabbitMQ confirmed it."""
        await publish(self._exchange, queue, body, message_id)

    async def start(self, request_id: str, request: booking_pb2.BookingRequest) -> None:
        """Publish the saga's first message (journaled first, with `--journal`)."""
        body = {
            "request_id": request_id,
            "product_id": request.ProductID,
            "count": request.Count or 1,
            "fault_inject": request.FaultInject,
            "order_id": 0,
            "payment_id": 0,
        }
        if self._journal is not None and not self._journal.begin(request_id, json.dumps(body)):
            return  # journaled before: its first message went out then
        await self.publish(self._order_queue, body, f"{request_id}:0:{self._names[0]}")

    async def create_order(self, message: AbstractIncomingMessage) -> None:
        """Hop 1: create the order, publish to hop 2 (confirmed), then ack."""
        body = json.loads(message.body)
        request_id = body["request_id"]
        journal = self._journal
        if journal is not None and journal.at(request_id) != 0:
            await message.ack()  # no such saga, or past this step: nothing to do
            return
        try:
            order = await self._order.CreateOrder(
                order_pb2.CreateOrderRequest(
                    RequestID=request_id, ProductID=body["product_id"], Count=body["count"]
                ),
                metadata=metadata(request_id, "create_order"),
                timeout=self._timeout,
            )
            body["order_id"] = order.OrderID
            if journal is not None:
                journal.step_done(request_id, 0, json.dumps(body), last=False)
            await self.publish(self._payment_queue, body, f"{request_id}:1:{self._names[1]}")
        except Exception:
            log.exception("create_order failed for %s, requeueing", request_id)
            await message.nack(requeue=True)
            return
        await message.ack()

    async def create_payment(self, message: AbstractIncomingMessage) -> None:
        """Hop 2: take the payment, then ack (and tell `paid`)."""
        body = json.loads(message.body)
        request_id = body["request_id"]
        journal = self._journal
        if journal is not None and journal.at(request_id) != 1:
            await message.ack()  # no such saga, or past this step: nothing to do
            return
        try:
            payment = await self._payment.CreatePayment(
                payment_pb2.CreatePaymentRequest(
                    RequestID=request_id,
                    OrderID=body["order_id"],
                    Amount=body["count"] * UNIT_PRICE,
                    FaultInject=body["fault_inject"],
                ),
                metadata=metadata(request_id, "create_payment"),
                timeout=self._timeout,
            )
        except Exception:
            log.exception("create_payment failed for %s, requeueing", request_id)
            await message.nack(requeue=True)
            return
        if journal is not None:
            body["payment_id"] = payment.PaymentID
            journal.step_done(request_id, 1, json.dumps(body), last=True)
        await message.ack()
        if self._paid is not None:
            self._paid(request_id, body["order_id"], payment.PaymentID)


class BaselineBooking(booking_pb2_grpc.BookingServiceServicer):
    """HandleAsyncBooking: publish the first message, answer with the request id."""

    def __init__(self, saga: Saga) -> None:
        self._saga = saga

    async def HandleSyncBooking(
        self, request: booking_pb2.BookingRequest, context: ServicerContext
    ) -> booking_pb2.BookingSyncResponse:
        """Not part of the baseline."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the baseline only books async")

    async def HandleAsyncBooking(
        self, request: booking_pb2.BookingRequest, context: ServicerContext
    ) -> booking_pb2.BookingASyncResponse:
        """Queue the booking; answer once the broker confirmed its first message."""
        request_id = request_id_of(context)
        try:
            await self._saga.start(request_id, request)
        except Exception as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot publish: {exc!r}")
        return booking_pb2.BookingASyncResponse(RequestID=request_id)


async def declare(
    channel: AbstractChannel,
    prefix: str,
    delivery_limit: int,
    names: tuple[str, str] = (ORDER_QUEUE, PAYMENT_QUEUE),
    first_max_length: int | None = None,
) -> AbstractExchange:
    """Declare the framework's topology under `prefix` (the first queue holding at most
    `first_max_length` messages, as a topic's `max_length`); return the main exchange."""
    (order_queue, order_dlq, payment_queue, payment_dlq), (name, dlx_name) = topology(prefix, names)
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, durable=True)
    dlx = await channel.declare_exchange(dlx_name, aio_pika.ExchangeType.DIRECT, durable=True)
    arguments: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": dlx_name,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    limit = {} if first_max_length is None else {"x-max-length": first_max_length}
    for queue_name, dlq_name, extra in (
        (order_queue, order_dlq, limit),
        (payment_queue, payment_dlq, {}),
    ):
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments={**arguments, **extra}
        )
        await queue.bind(exchange, routing_key=queue_name)
        dlq = await channel.declare_queue(
            dlq_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dlq.bind(dlx, routing_key=queue_name)
    return exchange


async def serve(
    args: argparse.Namespace,
    *,
    names: tuple[str, str] = (ORDER_QUEUE, PAYMENT_QUEUE),
    first_max_length: int | None = None,
    paid: Paid | None = None,
    servicer: Callable[[Saga], booking_pb2_grpc.BookingServiceServicer] = BaselineBooking,
) -> int:
    """Declare (the hops' queues `names`), consume and serve `servicer(saga)` until SIGINT or
    SIGTERM; `paid` is told of each payment taken."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    order_channel = grpc.aio.insecure_channel(args.order)
    payment_channel = grpc.aio.insecure_channel(args.payment)
    journal = None if args.journal is None else Journal(args.journal)
    if journal is not None:
        journal.start()
    connection = await aio_pika.connect(
        args.amqp_url, client_properties={"connection_name": "baseline_async"}
    )
    try:
        publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await declare(
            publish_channel, args.prefix, args.delivery_limit, names, first_max_length
        )
        saga = Saga(
            exchange,
            args.prefix,
            order_pb2_grpc.OrderServiceStub(order_channel),
            payment_pb2_grpc.PaymentServiceStub(payment_channel),
            args.timeout_seconds,
            names=names,
            paid=paid,
            journal=journal,
        )
        for queue_name, prefetch, handler in (
            (names[0], args.order_prefetch, saga.create_order),
            (names[1], args.payment_prefetch, saga.create_payment),
        ):
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.get_queue(f"{args.prefix}{queue_name}", ensure=False)
            await queue.consume(handler)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if args.reuse_port else 0)])
        booking_pb2_grpc.add_BookingServiceServicer_to_server(servicer(saga), server)
        health = HealthServicer()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if server.add_insecure_port(f"{args.host}:{args.port}") == 0:
            raise RuntimeError(f"cannot bind {args.host}:{args.port}")
        await server.start()
        try:
            await stop.wait()
        finally:
            await server.stop(1.0)
    finally:
        await connection.close()
        await order_channel.close(None)
        await payment_channel.close(None)
        if journal is not None:
            await journal.close()
    return 0


def baseline_parser(description: str | None) -> argparse.ArgumentParser:
    """The command line of a baseline on aio-pika (this one's, and the throttling one's)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--order", required=True, help="host:port of the OrderService")
    parser.add_argument("--payment", required=True, help="host:port of the PaymentService")
    parser.add_argument("--timeout-seconds", type=float, default=3.0)
    parser.add_argument("--amqp-url", required=True, help="the RabbitMQ to use")
    parser.add_argument("--prefix", required=True, help="prepended to queue and exchange names")
    parser.add_argument("--order-prefetch", type=int, default=64, help="create_order prefetch")
    parser.add_argument("--payment-prefetch", type=int, default=64, help="create_payment prefetch")
    parser.add_argument("--delivery-limit", type=int, default=5, help="x-delivery-limit")
    add_journal_option(parser)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and serve on uvloop."""
    parser = baseline_parser(__doc__.splitlines()[0] if __doc__ else None)
    add_processes_options(parser)
    args = parser.parse_args(argv)
    return as_processes(args, argv, lambda: uvloop.run(serve(args)))


if __name__ == "__main__":
    sys.exit(main())
