"""The demo OrderService, plus the call handling it shares with the PaymentService.

The shared helpers (idempotency key, injected latency and failures, error
wording, refusing compensated creates, undo by idempotency key, lookup by id or
else by request id) live here rather than in a module of their own: payments
already refer to orders, so the dependency is natural.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any, Final, TypeVar

import grpc

from pb import order_pb2, order_pb2_grpc
from upstream.ledger import AlreadyCompensated, Ledger, OrderRecord

IDEMPOTENCY_KEY_HEADER: Final = "x-idempotency-key"

T = TypeVar("T")


def idempotency_key(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The call's ``x-idempotency-key`` metadata value; ``None`` when absent or empty."""
    for key, value in context.invocation_metadata() or ():
        if key == IDEMPOTENCY_KEY_HEADER:
            text = value.decode() if isinstance(value, bytes) else value
            return text or None
    return None


def for_request(message: str, request_id: str) -> str:
    """``message`` naming ``request_id`` when there is one, so logs can be matched up."""
    return f"{message} for request {request_id!r}" if request_id else message


class FaultInjector:
    """Slows down and randomly fails calls, to exercise the orchestrator's retries.

    ``latency_ms`` is slept before each call; ``fail_rate`` is the fraction of
    calls (0 to 1) aborted with UNAVAILABLE before anything is applied, and
    ``fail_after_apply_rate`` the fraction of creates aborted with UNAVAILABLE
    after they were applied (a lost response).
    """

    def __init__(
        self, *, latency_ms: float = 0, fail_rate: float = 0, fail_after_apply_rate: float = 0
    ) -> None:
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms}")
        for name, rate in (
            ("fail_rate", fail_rate),
            ("fail_after_apply_rate", fail_after_apply_rate),
        ):
            if not 0 <= rate <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {rate}")
        self.latency_ms = latency_ms
        self.fail_rate = fail_rate
        self.fail_after_apply_rate = fail_after_apply_rate

    async def before_call(
        self, context: grpc.aio.ServicerContext[Any, Any], request_id: str
    ) -> None:
        """Sleep the latency, then abort UNAVAILABLE for the configured share of calls."""
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000)
        # random() is in [0, 1), so a rate of 1 fails every call and 0 none.
        if random.random() < self.fail_rate:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, for_request("transient failure (injected)", request_id)
            )

    async def after_apply(
        self, context: grpc.aio.ServicerContext[Any, Any], request_id: str
    ) -> None:
        """Abort UNAVAILABLE for the configured share of creates, which are already committed.

        The caller cannot tell this from a failure before the apply, so it must
        retry with the same idempotency key (or compensate) to stay correct.
        """
        if random.random() < self.fail_after_apply_rate:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                for_request("transient failure after apply (injected)", request_id),
            )


async def create_or_abort(
    context: grpc.aio.ServicerContext[Any, Any], create: Callable[[], T]
) -> T:
    """Run ``create``; abort ABORTED when its request id or its key was already compensated."""
    try:
        return create()
    except AlreadyCompensated as exc:
        await context.abort(grpc.StatusCode.ABORTED, str(exc))


async def find_one(
    context: grpc.aio.ServicerContext[Any, Any],
    noun: str,
    record_id: int,
    request_id: str,
    *,
    by_id: Callable[[int], T | None],
    by_request: Callable[[str], T | None],
) -> T:
    """Apply ``by_id`` to a non-zero ``record_id``, or else ``by_request`` to ``request_id``.

    Aborts INVALID_ARGUMENT when neither id is given and NOT_FOUND when the
    lookup finds nothing.
    """
    if record_id:
        record = by_id(record_id)
        missing = f"{noun} {record_id} not found"
    elif request_id:
        record = by_request(request_id)
        missing = f"no {noun} found"
    else:
        id_field = noun.capitalize() + "ID"
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"{id_field} or RequestID is required"
        )
    if record is None:
        await context.abort(grpc.StatusCode.NOT_FOUND, for_request(missing, request_id))
    return record


def _to_proto(record: OrderRecord) -> order_pb2.Order:
    return order_pb2.Order(
        OrderID=record.id,
        RequestID=record.request_id,
        ProductID=record.product_id,
        Count=record.count,
        Status=order_pb2.OrderStatus.Value(record.status),
    )


class OrderServicer(order_pb2_grpc.OrderServiceServicer):
    """``pb.OrderService`` over a :class:`~upstream.ledger.Ledger`, for ``grpc.aio`` servers."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        latency_ms: float = 0,
        fail_rate: float = 0,
        fail_after_apply_rate: float = 0,
    ) -> None:
        self._ledger = ledger
        self._faults = FaultInjector(
            latency_ms=latency_ms, fail_rate=fail_rate, fail_after_apply_rate=fail_after_apply_rate
        )

    async def CreateOrder(
        self,
        request: order_pb2.CreateOrderRequest,
        context: grpc.aio.ServicerContext[order_pb2.CreateOrderRequest, order_pb2.Order],
    ) -> order_pb2.Order:
        """Create a CREATED order; the same ``x-idempotency-key`` returns the same order.

        ABORTED, creating nothing, when RequestID or the key was already
        cancelled and the key made no order before.
        """
        rid = request.RequestID
        await self._faults.before_call(context, rid)
        if not rid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "RequestID is required")
        if request.ProductID <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                for_request(f"ProductID must be > 0, got {request.ProductID}", rid),
            )
        if request.Count < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                for_request(f"Count must be >= 0, got {request.Count}", rid),
            )
        key = idempotency_key(context)
        record = await create_or_abort(
            context,
            lambda: self._ledger.create_order(
                rid,
                request.ProductID,
                request.Count or 1,  # proto3 cannot tell 0 from unset, so 0 means the default
                idempotency_key=key,
            ),
        )
        await self._faults.after_apply(context, rid)
        return _to_proto(record)

    async def CancelOrder(
        self,
        request: order_pb2.CancelOrderRequest,
        context: grpc.aio.ServicerContext[order_pb2.CancelOrderRequest, order_pb2.Order],
    ) -> order_pb2.Order:
        """Cancel the order of IdempotencyKey, or else by OrderID, or else every order of RequestID.

        By IdempotencyKey it cancels only the order that key's create made and
        tombstones the key (a key that made nothing gets an empty Order: nothing
        to undo); by RequestID it cancels them all (returning the latest) and
        tombstones the request id, NOT_FOUND when there is none. Either tombstone
        is left whatever was found, so a create arriving later is refused.
        """
        await self._faults.before_call(context, request.RequestID)
        if request.IdempotencyKey:
            record = self._ledger.cancel_order_by_key(request.IdempotencyKey)
            return order_pb2.Order() if record is None else _to_proto(record)
        record = await find_one(
            context,
            "order",
            request.OrderID,
            request.RequestID,
            by_id=self._ledger.cancel_order,
            by_request=self._ledger.cancel_orders_of,
        )
        return _to_proto(record)

    async def GetOrder(
        self,
        request: order_pb2.GetOrderRequest,
        context: grpc.aio.ServicerContext[order_pb2.GetOrderRequest, order_pb2.Order],
    ) -> order_pb2.Order:
        """Find an order by OrderID, or else the latest of RequestID; NOT_FOUND when none."""
        await self._faults.before_call(context, request.RequestID)
        record = await find_one(
            context,
            "order",
            request.OrderID,
            request.RequestID,
            by_id=self._ledger.get_order,
            by_request=self._ledger.latest_order_of,
        )
        return _to_proto(record)
