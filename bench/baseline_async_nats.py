"""The NATS baseline of bench/async_booking.py: HandleAsyncBooking by hand on nats-py, no framework.

A bare grpc.aio servicer on uvloop (a health service too) whose
HandleAsyncBooking publishes a JSON message to the first subject and answers
with the request id once JetStream acknowledged it (`PubAck`). Two consumers
make the saga: subject 1 calls OrderService.CreateOrder, publishes to
subject 2 (acknowledged) and then acks; subject 2 calls
PaymentService.CreatePayment and acks. Upstream calls carry the framework's
metadata (``x-request-id``, ``x-idempotency-key``) and timeout.

The topology is the framework's (orchestrator/broker/_nats_topology.py): one
stream on disk with work-queue retention and a duplicate window
(``Nats-Msg-Id`` on every publish), and per subject a durable pull consumer
with explicit acks and ``max_deliver``. Each consumer pulls as the framework
does: one lingering request while idle, then as many ready messages as its
prefetch leaves room for, each handled in a task of its own.

    python bench/baseline_async_nats.py --port 10001 --order 127.0.0.1:50051 \\
        --payment 127.0.0.1:50052 --nats-url nats://127.0.0.1:4222 --prefix b.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import grpc
import nats
import nats.errors
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

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
ORDER: Final = "create_order"
PAYMENT: Final = "create_payment"
ServicerContext = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger("baseline_async_nats")


def stream_name(prefix: str) -> str:
    """The stream the baseline declares for `prefix`, to delete it after."""
    return "BASELINE-" + prefix.rstrip(".").replace(".", "_")


def request_id_of(context: ServicerContext) -> str:
    """The caller's `x-request-id`, or a new UUID4."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return value.decode() if isinstance(value, bytes) else value
    return str(uuid.uuid4())


def metadata(request_id: str, step: str) -> tuple[tuple[str, str], ...]:
    """The framework's upstream metadata (orchestrator.idempotency_metadata)."""
    return (("x-request-id", request_id), ("x-idempotency-key", f"{request_id}:{step}"))


class Saga:
    """The two hops of the saga and the publishing they share."""

    def __init__(
        self,
        js: JetStreamContext,
        prefix: str,
        order: order_pb2_grpc.OrderServiceAsyncStub,
        payment: payment_pb2_grpc.PaymentServiceAsyncStub,
        timeout_seconds: float,
    ) -> None:
        self._js = js
        self._stream = stream_name(prefix)
        self._prefix = prefix
        self._order = order
        self._payment = payment
        self._timeout = timeout_seconds

    def subject(self, topic: str) -> str:
        """Where `topic`'s messages go."""
        return f"{self._prefix}{topic}"

    async def publish(self, topic: str, body: dict[str, Any], message_id: str) -> None:
        """Publish; returns once JetStream acknowledged it."""
        await self._js.publish(
            self.subject(topic),
            json.dumps(body).encode(),
            timeout=5,
            stream=self._stream,
            headers={"Nats-Msg-Id": message_id},
        )

    async def start(self, request_id: str, request: booking_pb2.BookingRequest) -> None:
        """Publish the saga's first message."""
        body = {
            "request_id": request_id,
            "product_id": request.ProductID,
            "count": request.Count or 1,
            "fault_inject": request.FaultInject,
            "order_id": 0,
            "payment_id": 0,
        }
        await self.publish(ORDER, body, f"{request_id}:0:{ORDER}")

    async def create_order(self, message: Msg) -> None:
        """Hop 1: create the order, publish to hop 2 (acknowledged), then ack."""
        body = json.loads(message.data)
        request_id = body["request_id"]
        try:
            order = await self._order.CreateOrder(
                order_pb2.CreateOrderRequest(
                    RequestID=request_id, ProductID=body["product_id"], Count=body["count"]
                ),
                metadata=metadata(request_id, ORDER),
                timeout=self._timeout,
            )
            body["order_id"] = order.OrderID
            await self.publish(PAYMENT, body, f"{request_id}:1:{PAYMENT}")
        except Exception:
            log.exception("create_order failed for %s, redelivering", request_id)
            await message.nak(delay=0.05)
            return
        await message.ack()

    async def create_payment(self, message: Msg) -> None:
        """Hop 2: take the payment, then ack."""
        body = json.loads(message.data)
        request_id = body["request_id"]
        try:
            await self._payment.CreatePayment(
                payment_pb2.CreatePaymentRequest(
                    RequestID=request_id,
                    OrderID=body["order_id"],
                    Amount=body["count"] * UNIT_PRICE,
                    FaultInject=body["fault_inject"],
                ),
                metadata=metadata(request_id, PAYMENT),
                timeout=self._timeout,
            )
        except Exception:
            log.exception("create_payment failed for %s, redelivering", request_id)
            await message.nak(delay=0.05)
            return
        await message.ack()


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
        """Queue the booking; answer once JetStream acknowledged its first message."""
        request_id = request_id_of(context)
        try:
            await self._saga.start(request_id, request)
        except Exception as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot publish: {exc!r}")
        return booking_pb2.BookingASyncResponse(RequestID=request_id)


async def consume(
    pull: JetStreamContext.PullSubscription,
    prefetch: int,
    handle: Callable[[Msg], Awaitable[None]],
) -> None:
    """Pull and handle messages, `prefetch` at once, until cancelled."""
    running: set[asyncio.Task[None]] = set()
    room = asyncio.Event()
    room.set()

    def finished(task: asyncio.Task[None]) -> None:
        running.discard(task)
        room.set()

    while True:
        await room.wait()
        try:
            messages = await pull.fetch(1, timeout=1)
            free = prefetch - len(running) - 1
            if free > 0:
                with contextlib.suppress(TimeoutError):
                    messages += await pull.fetch(free, timeout=0.005)
        except (TimeoutError, nats.errors.Error):
            continue
        for message in messages:
            task = asyncio.create_task(handle(message))
            running.add(task)
            task.add_done_callback(finished)
        if len(running) >= prefetch:
            room.clear()


async def declare(js: JetStreamContext, prefix: str, delivery_limit: int) -> None:
    """The framework's topology under `prefix`."""
    stream = stream_name(prefix)
    await js.add_stream(
        StreamConfig(
            name=stream,
            subjects=[f"{prefix}{ORDER}", f"{prefix}{PAYMENT}"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
    )
    for topic in (ORDER, PAYMENT):
        await js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=topic,
                filter_subject=f"{prefix}{topic}",
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30,
                max_deliver=delivery_limit + 1,
            ),
        )


async def serve(args: argparse.Namespace) -> int:
    """Declare, consume and serve until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    order_channel = grpc.aio.insecure_channel(args.order)
    payment_channel = grpc.aio.insecure_channel(args.payment)
    client = await nats.connect(args.nats_url, name="baseline_async_nats")
    consumers: list[asyncio.Task[None]] = []
    try:
        js = client.jetstream()
        await declare(js, args.prefix, args.delivery_limit)
        saga = Saga(
            js,
            args.prefix,
            order_pb2_grpc.OrderServiceStub(order_channel),
            payment_pb2_grpc.PaymentServiceStub(payment_channel),
            args.timeout_seconds,
        )
        for topic, prefetch, handler in (
            (ORDER, args.order_prefetch, saga.create_order),
            (PAYMENT, args.payment_prefetch, saga.create_payment),
        ):
            pull = await js.pull_subscribe_bind(topic, stream_name(args.prefix))
            consumers.append(asyncio.create_task(consume(pull, prefetch, handler)))
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if args.reuse_port else 0)])
        booking_pb2_grpc.add_BookingServiceServicer_to_server(BaselineBooking(saga), server)
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
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        await client.close()
        await order_channel.close(None)
        await payment_channel.close(None)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and serve on uvloop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--order", required=True, help="host:port of the OrderService")
    parser.add_argument("--payment", required=True, help="host:port of the PaymentService")
    parser.add_argument("--timeout-seconds", type=float, default=3.0)
    parser.add_argument("--nats-url", required=True, help="the NATS server to use")
    parser.add_argument("--prefix", required=True, help="prepended to subjects and the stream")
    parser.add_argument("--order-prefetch", type=int, default=64, help="create_order pulls")
    parser.add_argument("--payment-prefetch", type=int, default=64, help="create_payment pulls")
    parser.add_argument("--delivery-limit", type=int, default=5, help="max_deliver - 1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    add_processes_options(parser)
    args = parser.parse_args(argv)
    return as_processes(args, argv, lambda: uvloop.run(serve(args)))


if __name__ == "__main__":
    sys.exit(main())
