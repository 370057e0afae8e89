"""The baseline of bench/sync_booking.py: HandleSyncBooking written by hand, no framework.

A bare grpc.aio servicer on uvloop: it reads ``x-request-id`` (or makes a
UUID4), calls OrderService.CreateOrder then PaymentService.CreatePayment with
the same metadata and timeout as the framework's nodes, and answers with both
ids. Channels and stubs are made once at startup. The server has the
framework's options (``grpc.so_reuseport`` 0) and a health service, so the
bench can wait for it the same way; it serves until SIGINT or SIGTERM.

    python bench/baseline_sync.py --port 10001 --order 127.0.0.1:50051 --payment 127.0.0.1:50052
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import uvloop
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

UNIT_PRICE = 100  # node.booking.UNIT_PRICE, not imported: the baseline uses no app code
ServicerContext = grpc.aio.ServicerContext[Any, Any]


class BaselineBooking(booking_pb2_grpc.BookingServiceServicer):
    """The two upstream calls of the sync booking saga, and nothing else."""

    def __init__(
        self,
        order: order_pb2_grpc.OrderServiceAsyncStub,
        payment: payment_pb2_grpc.PaymentServiceAsyncStub,
        timeout_seconds: float,
        journal: Journal | None = None,
    ) -> None:
        self._order = order
        self._payment = payment
        self._timeout = timeout_seconds
        self._journal = journal

    async def HandleSyncBooking(
        self, request: booking_pb2.BookingRequest, context: ServicerContext
    ) -> booking_pb2.BookingSyncResponse:
        """Create the order, then the payment; an upstream error fails the call."""
        request_id = ""
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id":
                request_id = value.decode() if isinstance(value, bytes) else value
                break
        if not request_id:
            request_id = str(uuid.uuid4())
        count = request.Count or 1
        journal = self._journal
        if journal is not None and not journal.begin(request_id, _data(request, 0, 0)):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{request_id} was booked before")
        order = await self._order.CreateOrder(
            order_pb2.CreateOrderRequest(
                RequestID=request_id, ProductID=request.ProductID, Count=count
            ),
            metadata=(
                ("x-request-id", request_id),
                ("x-idempotency-key", f"{request_id}:create_order"),
            ),
            timeout=self._timeout,
        )
        if journal is not None:
            journal.step_done(request_id, 0, _data(request, order.OrderID, 0), last=False)
        payment = await self._payment.CreatePayment(
            payment_pb2.CreatePaymentRequest(
                RequestID=request_id,
                OrderID=order.OrderID,
                Amount=count * UNIT_PRICE,
                FaultInject=request.FaultInject,
            ),
            metadata=(
                ("x-request-id", request_id),
                ("x-idempotency-key", f"{request_id}:create_payment"),
            ),
            timeout=self._timeout,
        )
        if journal is not None:
            data = _data(request, order.OrderID, payment.PaymentID)
            journal.step_done(request_id, 1, data, last=True)
        return booking_pb2.BookingSyncResponse(
            RequestID=request_id, OrderID=order.OrderID, PaymentID=payment.PaymentID
        )

    async def HandleAsyncBooking(
        self, request: booking_pb2.BookingRequest, context: ServicerContext
    ) -> booking_pb2.BookingASyncResponse:
        """Not part of the baseline."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the baseline only books in sync")


def _data(request: booking_pb2.BookingRequest, order_id: int, payment_id: int) -> str:
    """The booking as the journal keeps it: the request and the ids made so far, as JSON."""
    return json.dumps(
        {
            "product_id": request.ProductID,
            "count": request.Count or 1,
            "fault_inject": request.FaultInject,
            "order_id": order_id,
            "payment_id": payment_id,
        }
    )


async def serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM."""
    journal = None if args.journal is None else Journal(args.journal)
    if journal is not None:
        journal.start()
    order_channel = grpc.aio.insecure_channel(args.order)
    payment_channel = grpc.aio.insecure_channel(args.payment)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if args.reuse_port else 0)])
    booking_pb2_grpc.add_BookingServiceServicer_to_server(
        BaselineBooking(
            order_pb2_grpc.OrderServiceStub(order_channel),
            payment_pb2_grpc.PaymentServiceStub(payment_channel),
            args.timeout_seconds,
            journal,
        ),
        server,
    )
    health = HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if server.add_insecure_port(f"{args.host}:{args.port}") == 0:
        raise RuntimeError(f"cannot bind {args.host}:{args.port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop(1.0)
        await order_channel.close(None)
        await payment_channel.close(None)
        if journal is not None:
            await journal.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and serve on uvloop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--order", required=True, help="host:port of the OrderService")
    parser.add_argument("--payment", required=True, help="host:port of the PaymentService")
    parser.add_argument("--timeout-seconds", type=float, default=3.0)
    add_processes_options(parser)
    add_journal_option(parser)
    args = parser.parse_args(argv)
    return as_processes(args, argv, lambda: uvloop.run(serve(args)))


if __name__ == "__main__":
    sys.exit(main())
