"""The baseline of bench/throttling_booking.py: HandleThrottlingBooking by hand on aio-pika.

The same saga as bench/baseline_async.py (its code, imported: topology,
publishing with confirms, the two consumers), with the caller waiting for the
outcome, in one process: the servicer registers a future under the request id,
publishes the first hop (persistent, ``mandatory``, confirmed); the
create_order consumer calls CreateOrder and publishes the second hop; the
create_payment consumer calls CreatePayment, acks, and resolves the future;
the servicer answers with the order and payment ids. Its queues are named as
the framework's topics (``throttling_create_order``, ``throttling_create_payment``)
under the baseline's prefix, with the same prefetch, and the first holds at
most ``--max-length`` messages (``x-max-length``, ``reject-publish``): a first hop
the queue refuses is RESOURCE_EXHAUSTED with the framework's
``grpc-retry-pushback-ms`` trailer, as the framework's admission control
answers, and so is a call past ``--max-in-flight`` calls in progress (the
framework's ``max_in_flight``). A wait longer than the caller's deadline or
``--max-wait-seconds`` is DEADLINE_EXCEEDED (the saga goes on). There is no compensation: a hop that
keeps failing is requeued up to the delivery limit, then dead-lettered, and
its caller gets DEADLINE_EXCEEDED (the bench's bookings never fail).

    python bench/baseline_throttling.py --port 10001 --order 127.0.0.1:50051 \\
        --payment 127.0.0.1:50052 --amqp-url amqp://guest:guest@127.0.0.1:5672/ --prefix b. \\
        --order-prefetch 8 --payment-prefetch 8 --max-length 1000
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import grpc
import uvloop
from aio_pika.exceptions import DeliveryError, PublishError

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

from bench.baseline_async import (  # noqa: E402
    Saga,
    ServicerContext,
    baseline_parser,
    request_id_of,
    serve,
)
from pb import booking_pb2, booking_pb2_grpc  # noqa: E402

NAMES: Final = ("throttling_create_order", "throttling_create_payment")
"""The two hops' queues (under the prefix): the framework's topic names."""
RETRY_PUSHBACK_TRAILER: Final = "grpc-retry-pushback-ms"
PUSHBACK_MS: Final = 1000
"""What a refused caller is asked to wait: `sagas.retry_pushback_seconds`'s default."""


class Waiters:
    """The futures of the calls waiting for their saga's end, by request id."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[tuple[int, int]]] = {}

    def expect(self, request_id: str) -> asyncio.Future[tuple[int, int]]:
        """The future of `request_id`'s (order id, payment id); register it before publishing."""
        future: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        return future

    def forget(self, request_id: str) -> None:
        """Stop waiting for `request_id` (answered, refused or timed out)."""
        self._waiting.pop(request_id, None)

    def paid(self, request_id: str, order_id: int, payment_id: int) -> None:
        """The saga of `request_id` took its payment: wake its caller, if still waiting."""
        future = self._waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result((order_id, payment_id))


class BaselineThrottling(booking_pb2_grpc.BookingServiceServicer):
    """HandleThrottlingBooking: publish the first hop, answer with the saga's outcome."""

    def __init__(
        self, saga: Saga, waiters: Waiters, max_wait_seconds: float, max_in_flight: int
    ) -> None:
        self._saga = saga
        self._waiters = waiters
        self._max_wait = max_wait_seconds
        self._max_in_flight = max_in_flight
        self._in_flight = 0

    async def HandleThrottlingBooking(
        self, request: booking_pb2.BookingRequest, context: ServicerContext
    ) -> booking_pb2.BookingSyncResponse:
        """Start the saga and wait for its payment, the caller's deadline at most."""
        request_id = request_id_of(context)
        if self._max_in_flight and self._in_flight >= self._max_in_flight:
            context.set_trailing_metadata(((RETRY_PUSHBACK_TRAILER, str(PUSHBACK_MS)),))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._in_flight} calls in progress: try again in {PUSHBACK_MS / 1000:g}s",
            )
        self._in_flight += 1
        outcome = self._waiters.expect(request_id)  # before publishing: it may finish first
        try:
            try:
                await self._saga.start(request_id, request)
            except PublishError as exc:  # returned: no queue (a DeliveryError too, so first)
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot publish: {exc!r}")
            except DeliveryError:  # nacked: with reject-publish, the queue is full
                context.set_trailing_metadata(((RETRY_PUSHBACK_TRAILER, str(PUSHBACK_MS)),))
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the first queue is full: try again in {PUSHBACK_MS / 1000:g}s",
                )
            except Exception as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot publish: {exc!r}")
            remaining = context.time_remaining()
            wait = self._max_wait if remaining is None else min(remaining, self._max_wait)
            try:
                order_id, payment_id = await asyncio.wait_for(outcome, wait)
            except TimeoutError:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the saga did not end within {wait:.3g}s; it goes on",
                )
        finally:
            self._in_flight -= 1
            self._waiters.forget(request_id)
        return booking_pb2.BookingSyncResponse(
            RequestID=request_id, OrderID=order_id, PaymentID=payment_id
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and serve on uvloop."""
    parser = baseline_parser(__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--max-length", type=int, help="messages the first queue holds at most (default: no limit)"
    )
    parser.add_argument(
        "--max-wait-seconds",
        type=float,
        default=180.0,
        help="how long a call waits for its saga at most (sagas.max_wait_seconds)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=0,
        help="calls in progress at most, past which a call is refused (sagas max_in_flight; "
        "default: no limit)",
    )
    args = parser.parse_args(argv)
    args.reuse_port = False
    waiters = Waiters()
    return uvloop.run(
        serve(
            args,
            names=NAMES,
            first_max_length=args.max_length,
            paid=waiters.paid,
            servicer=lambda saga: BaselineThrottling(
                saga, waiters, args.max_wait_seconds, args.max_in_flight
            ),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
