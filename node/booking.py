"""Booking nodes: create the order, take the payment, and undo both on rollback.

Each upstream call carries the idempotency key of its saga's step
(`step_metadata()`), so a retried or redelivered step returns the record it
created the first time, and two sagas never share an effect, even under one
request id.
"""

from __future__ import annotations

import grpc

from dto import BookingMsgDTO
from node.upstream import Upstreams
from orchestrator import (
    AsyncNode,
    Context,
    Rollback,
    RollbackNode,
    SyncNode,
    idempotency_key,
    step_metadata,
    step_timeout,
)
from pb import booking_pb2, order_pb2, payment_pb2

UNIT_PRICE = 100
"""The demo's price of one product, in cents: a booking pays at most `MAX_COUNT * UNIT_PRICE`."""

CREATE_ORDER = "create_order"
CREATE_PAYMENT = "create_payment"
"""The step names of both booking facades: the rollback undoes each by the key it used."""

SyncBookingNode = SyncNode[booking_pb2.BookingRequest, booking_pb2.BookingSyncResponse]
SyncBookingContext = Context[booking_pb2.BookingRequest, booking_pb2.BookingSyncResponse]


async def _create_order(up: Upstreams, request_id: str, product_id: int, count: int) -> int:
    order = await up.order.CreateOrder(
        order_pb2.CreateOrderRequest(RequestID=request_id, ProductID=product_id, Count=count),
        metadata=step_metadata(),
        timeout=step_timeout(up.timeout_seconds),
    )
    return order.OrderID


async def _create_payment(
    up: Upstreams, request_id: str, order_id: int, count: int, fault_inject: bool
) -> int:
    payment = await up.payment.CreatePayment(
        payment_pb2.CreatePaymentRequest(
            RequestID=request_id,
            OrderID=order_id,
            Amount=count * UNIT_PRICE,
            FaultInject=fault_inject,
        ),
        metadata=step_metadata(),
        timeout=step_timeout(up.timeout_seconds),
    )
    return payment.PaymentID


def create_order_sync_node(up: Upstreams) -> SyncBookingNode:
    """Sync node: create the order and put its id in the response."""

    async def create_order(request_id: str, ctx: SyncBookingContext) -> None:
        request = ctx.request
        ctx.response.OrderID = await _create_order(up, request_id, request.ProductID, request.Count)

    return create_order


def create_payment_sync_node(up: Upstreams) -> SyncBookingNode:
    """Sync node: pay for the order and put the payment's id in the response."""

    async def create_payment(request_id: str, ctx: SyncBookingContext) -> None:
        request = ctx.request
        ctx.response.PaymentID = await _create_payment(
            up, request_id, ctx.response.OrderID, request.Count, request.FaultInject
        )

    return create_payment


def create_order_async_node(up: Upstreams) -> AsyncNode[BookingMsgDTO]:
    """Async node: create the order and record its id in the DTO."""

    async def create_order(dto: BookingMsgDTO) -> BookingMsgDTO:
        dto.order_id = await _create_order(up, dto.request_id, dto.product_id, dto.count)
        return dto

    return create_order


def create_payment_async_node(up: Upstreams) -> AsyncNode[BookingMsgDTO]:
    """Async node: pay for the order and record the payment's id in the DTO."""

    async def create_payment(dto: BookingMsgDTO) -> BookingMsgDTO:
        dto.payment_id = await _create_payment(
            up, dto.request_id, dto.order_id, dto.count, dto.fault_inject
        )
        return dto

    return create_payment


def cancel_booking_node(up: Upstreams) -> RollbackNode:
    """Rollback node of both facades: refund the payment and cancel the order the saga made.

    Each undo names the create by the idempotency key its step used, so it
    undoes exactly what this saga created (another saga under the same request
    id keeps its order), even a create whose answer was lost; and the key is
    refused from then on, so a create arriving late makes nothing. Both undos
    are tried even when one fails; raising makes the engine retry the rollback.
    """

    async def cancel_booking(rollback: Rollback) -> None:
        errors: list[grpc.aio.AioRpcError] = []
        try:  # a key that made no payment has nothing to refund: that is an answer too
            await up.payment.RefundPayment(
                payment_pb2.RefundPaymentRequest(IdempotencyKey=idempotency_key(CREATE_PAYMENT)),
                metadata=step_metadata(),
                timeout=step_timeout(up.timeout_seconds),
            )
        except grpc.aio.AioRpcError as exc:
            errors.append(exc)
        try:
            await up.order.CancelOrder(
                order_pb2.CancelOrderRequest(IdempotencyKey=idempotency_key(CREATE_ORDER)),
                metadata=step_metadata(),
                timeout=step_timeout(up.timeout_seconds),
            )
        except grpc.aio.AioRpcError as exc:
            errors.append(exc)
        if errors:
            raise errors[0]

    return cancel_booking
