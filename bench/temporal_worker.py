"""The booking saga on Temporal's Python SDK: bench/compare_temporal.py's Temporal worker.

Workflow ``BookingSaga`` runs activity ``CreateOrder``, then ``CreatePayment``,
against the same demo Order and Payment upstreams as the framework, with the
same request, metadata and timeout as its nodes (``node/booking.py``): the
``x-request-id``, and an ``x-idempotency-key`` per step,
``TemporalBooking:<request id>:<step>``, so a retried activity returns the
record its first attempt made. When either step fails for good, the workflow
runs the compensating activity ``CancelBooking`` (the framework's rollback node
``cancel_booking``: refund the payment and cancel the order the saga's keys
made, both tried, under a key of its own) and then fails.

Retries mirror the framework's defaults (``orchestrator/facade/definition.py``):
a step gets 3 attempts, 50 ms first backoff doubling up to 1 s, and only gRPC
UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are retried; the
compensation gets 5 attempts from 100 ms up to 2 s, whatever the failure.
Each attempt has the upstream timeout as its start-to-close timeout, and the
upstream call the same deadline.

The worker runs the SDK's defaults (sandboxed workflows, a sticky cache of
1000 workflows, 5 pollers per task queue, eager activities) unless the options
say otherwise; it serves until SIGINT or SIGTERM.

    python bench/temporal_worker.py --address 127.0.0.1:7233 --task-queue booking \\
        --order 127.0.0.1:50051 --payment 127.0.0.1:50052
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Final, TypeVar

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import PollerBehaviorSimpleMaximum, UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

if not workflow.unsafe.in_sandbox():  # the sandbox re-imports this module, the path set
    ROOT = Path(__file__).resolve().parent.parent
    if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
        sys.path.insert(0, str(ROOT))

with workflow.unsafe.imports_passed_through():  # else the sandbox re-imports them per workflow
    import grpc
    import uvloop

    from pb import order_pb2, order_pb2_grpc, payment_pb2, payment_pb2_grpc

T = TypeVar("T")

WORKFLOW: Final = "BookingSaga"
SAGA_NAME: Final = "TemporalBooking"
"""The first part of the idempotency keys, as a facade's name is in the framework's."""
UNIT_PRICE: Final = 100  # node.booking.UNIT_PRICE, not imported: the worker uses no app code
RETRYABLE: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
"""orchestrator.retry.DEFAULT_RETRYABLE: the codes a step retries."""
STEP_RETRY: Final = RetryPolicy(
    initial_interval=timedelta(milliseconds=50),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=1),
    maximum_attempts=3,
)
COMPENSATION_RETRY: Final = RetryPolicy(
    initial_interval=timedelta(milliseconds=100),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=2),
    maximum_attempts=5,
)


@dataclass
class Booking:
    """The workflow's input: what HandleSyncBooking's request carries, and the step timeout."""

    request_id: str
    product_id: int
    count: int = 1
    fault_inject: bool = False
    timeout_seconds: float = 3.0


@dataclass
class Payment:
    """CreatePayment's input: the booking and the order it pays for."""

    booking: Booking
    order_id: int


@dataclass
class Booked:
    """The workflow's result: the ids HandleSyncBooking answers with."""

    order_id: int
    payment_id: int


def step_key(request_id: str, step: str) -> str:
    """The idempotency key of `step` in the saga of `request_id`."""
    return f"{SAGA_NAME}:{request_id}:{step}"


class BookingActivities:
    """The saga's upstream calls, on one channel per upstream made at startup."""

    def __init__(self, order_address: str, payment_address: str) -> None:
        self._channels = (
            grpc.aio.insecure_channel(order_address),
            grpc.aio.insecure_channel(payment_address),
        )
        self._order = order_pb2_grpc.OrderServiceStub(self._channels[0])
        self._payment = payment_pb2_grpc.PaymentServiceStub(self._channels[1])

    async def close(self) -> None:
        """Close the channels."""
        for channel in self._channels:
            await channel.close(None)

    @activity.defn(name="CreateOrder")
    async def create_order(self, booking: Booking) -> int:
        """Create the order; its id."""
        request = order_pb2.CreateOrderRequest(
            RequestID=booking.request_id, ProductID=booking.product_id, Count=booking.count
        )
        order = await call(self._order.CreateOrder, request, booking, "create_order")
        return order.OrderID

    @activity.defn(name="CreatePayment")
    async def create_payment(self, payment: Payment) -> int:
        """Pay for the order; the payment's id."""
        booking = payment.booking
        request = payment_pb2.CreatePaymentRequest(
            RequestID=booking.request_id,
            OrderID=payment.order_id,
            Amount=booking.count * UNIT_PRICE,
            FaultInject=booking.fault_inject,
        )
        paid = await call(self._payment.CreatePayment, request, booking, "create_payment")
        return paid.PaymentID

    @activity.defn(name="CancelBooking")
    async def cancel_booking(self, booking: Booking) -> None:
        """Refund the payment and cancel the order the saga's keys made (either may be none),
        one after the other as the rollback node does; both are tried, any failure retried."""
        rid = booking.request_id
        undos = (
            (
                self._payment.RefundPayment,
                payment_pb2.RefundPaymentRequest(IdempotencyKey=step_key(rid, "create_payment")),
            ),
            (
                self._order.CancelOrder,
                order_pb2.CancelOrderRequest(IdempotencyKey=step_key(rid, "create_order")),
            ),
        )
        failures: list[ApplicationError] = []
        for rpc, request in undos:
            try:
                await call(rpc, request, booking, "rollback", always_retry=True)
            except ApplicationError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


async def call(
    rpc: Callable[..., Awaitable[T]],
    request: object,
    booking: Booking,
    step: str,
    *,
    always_retry: bool = False,
) -> T:
    """Call an upstream for `step` of the booking's saga, with the step's metadata and the
    booking's timeout; a failure becomes an ApplicationError, retryable as its code says (or
    `always_retry`)."""
    try:
        return await rpc(
            request,
            metadata=(
                ("x-request-id", booking.request_id),
                ("x-idempotency-key", step_key(booking.request_id, step)),
            ),
            timeout=booking.timeout_seconds,
        )
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        retryable = always_retry or code in RETRYABLE
        raise ApplicationError(
            exc.details() or code.name, type=code.name, non_retryable=not retryable
        ) from exc


@workflow.defn(name=WORKFLOW)
class BookingSaga:
    """Create the order, then the payment; on a failure, cancel the booking and fail."""

    @workflow.run
    async def run(self, booking: Booking) -> Booked:
        """The saga: two steps and, when one fails for good, the compensation."""
        timeout = timedelta(seconds=booking.timeout_seconds)
        try:
            order_id: int = await workflow.execute_activity(
                "CreateOrder",
                booking,
                start_to_close_timeout=timeout,
                retry_policy=STEP_RETRY,
                result_type=int,
            )
            payment_id: int = await workflow.execute_activity(
                "CreatePayment",
                Payment(booking, order_id),
                start_to_close_timeout=timeout,
                retry_policy=STEP_RETRY,
                result_type=int,
            )
        except ActivityError:
            await workflow.execute_activity(
                "CancelBooking",
                booking,
                start_to_close_timeout=timeout,
                retry_policy=COMPENSATION_RETRY,
            )
            raise
        return Booked(order_id, payment_id)


async def serve(args: argparse.Namespace) -> int:
    """Poll the task queue until SIGINT or SIGTERM."""
    client = await Client.connect(args.address, namespace=args.namespace)
    activities = BookingActivities(args.order, args.payment)
    runner = UnsandboxedWorkflowRunner() if args.unsandboxed else SandboxedWorkflowRunner()
    worker = Worker(
        client,
        task_queue=args.task_queue,
        workflows=[BookingSaga],
        activities=[
            activities.create_order,
            activities.create_payment,
            activities.cancel_booking,
        ],
        max_cached_workflows=args.max_cached_workflows,
        workflow_task_poller_behavior=PollerBehaviorSimpleMaximum(args.pollers),
        activity_task_poller_behavior=PollerBehaviorSimpleMaximum(args.pollers),
        workflow_runner=runner,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with worker:
            print(f"worker polling {args.task_queue} on {args.address}", flush=True)
            await stop.wait()
    finally:
        await activities.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and run the worker on uvloop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    for flag, text in (
        ("--address", "host:port of the Temporal frontend"),
        ("--task-queue", "the task queue to poll"),
        ("--order", "host:port of the OrderService"),
        ("--payment", "host:port of the PaymentService"),
    ):
        parser.add_argument(flag, required=True, help=text)
    parser.add_argument("--namespace", default="default", help="(default: default)")
    parser.add_argument("--max-cached-workflows", type=int, default=1000, help="sticky cache size")
    parser.add_argument("--pollers", type=int, default=5, help="pollers per task queue")
    parser.add_argument("--unsandboxed", action="store_true", help="workflows out of the sandbox")
    return uvloop.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
